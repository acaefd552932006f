"""`asympo bench`: the performance sections (engine, learner, runtime, precision, LoRA, engines) and the
suite that runs them side by side (suite.py); product code never imports this package."""
