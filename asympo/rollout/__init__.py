"""Rollout engines: prompts in, sampled responses (tagged with the policy version) out."""
