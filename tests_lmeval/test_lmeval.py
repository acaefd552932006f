"""lm-eval's API backends (`local-completions`, `local-chat-completions`) score tasks against `asympo serve`
exactly as its `hf` backend scores them in-process on the same weights.

The tasks are written here: a `generate_until` task whose `until` strings cut answers short (the server's
stop strings), and a `multiple_choice` task scored by log-likelihood (the server's `echo` + `logprobs`). The
model is the built-in tiny one, given a chat template. Both backends get the model's own tokenizer object:
transformers' AutoTokenizer would load the tiny model's character vocabulary as a Qwen2 byte-level
tokenizer, which drops spaces and newlines (see docs/serving.md).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from serving import Server

from asympo.models.load import load_folder, tiny_checkpoint

NAME = "asympo-tiny"
TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
ITEMS = 40
TOLERANCE = 1e-4  # per-item log-likelihood, float32: the server scores in one pass, hf in its own batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model with a chat template, saved where both the server and the hf backend load it."""
    where = tmp_path_factory.mktemp("model") / "tiny-chat"
    shutil.copytree(tiny_checkpoint(), where)
    _, tokenizer = load_folder(where)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(where)
    return where


@pytest.fixture(scope="module")
def model_and_tokenizer(folder):
    return load_folder(folder)


@pytest.fixture(scope="module")
def server(folder):
    s = Server(f"model={folder}", f"served_name=[{NAME},tiny]")
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two tasks on sums like the tiny model was trained on: generation cut by `until`, and choices."""
    where = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = []
    for _ in range(ITEMS):
        a, b = rng.randrange(10, 99), rng.randrange(10, 99)
        answer = a + b
        wrong = rng.sample([answer + d for d in (-10, -1, 1, 10, 11)], 3)
        choices = [str(c) for c in [answer, *wrong]]
        rng.shuffle(choices)
        rows.append(
            {
                "question": f"{a}+{b}=",
                "answer": str(answer),
                "choices": choices,
                "label": choices.index(str(answer)),
            }
        )
    data = where / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "doc_to_text: '{{question}}'\n"
    )
    (where / "gen.yaml").write_text(
        "task: asympo_sums_gen\n" + common + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        # "5" cuts many answers short: the stop strings must cut exactly where hf's `until` does
        "generation_kwargs:\n  until: ['5', '\\n\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    (where / "mc.yaml").write_text(
        "task: asympo_sums_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: choices\n"
        "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    return where


def evaluate(lm, tasks, names: list[str], chat: bool = False) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        apply_chat_template=chat,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def hf(model_and_tokenizer):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = model_and_tokenizer
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, max_length=128)


def api(kind: str, server: Server, own_tokenizer, **kwargs):
    from lm_eval.api.registry import get_model

    path = "/chat/completions" if kind == "local-chat-completions" else "/completions"
    lm = get_model(kind)(
        base_url=server.url + path, model=NAME, max_length=128, num_concurrent=1, max_retries=1, **kwargs
    )
    lm.tokenizer = own_tokenizer  # the model's own tokenizer object (see the module docstring)
    return lm


def by_doc(result: dict, task: str) -> list[dict]:
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def reference(model_and_tokenizer, tasks):
    return evaluate(hf(model_and_tokenizer), tasks, ["asympo_sums_gen", "asympo_sums_mc"])


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_local_completions_scores_exactly_as_hf(
    server, folder, model_and_tokenizer, tasks, reference, tokenized
):
    _, tokenizer = model_and_tokenizer
    lm = api(
        "local-completions",
        server,
        tokenizer,
        tokenizer_backend="huggingface",
        tokenizer=str(folder),
        tokenized_requests=tokenized,
        batch_size=4,
    )
    result = evaluate(lm, tasks, ["asympo_sums_gen", "asympo_sums_mc"])

    # generation: every greedy answer identical, cut at the same `until` strings
    ours, theirs = by_doc(result, "asympo_sums_gen"), by_doc(reference, "asympo_sums_gen")
    assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in theirs]
    cut = sum("5" in s["target"] and s["filtered_resps"][0] != s["target"] for s in theirs)
    assert cut > 0, "no answer was cut by the stop strings: the task does not test them"
    assert result["results"]["asympo_sums_gen"] == reference["results"]["asympo_sums_gen"]

    # multiple choice: per choice log-likelihood within float32 tolerance, is-greedy equal, accuracy equal
    ours, theirs = by_doc(result, "asympo_sums_mc"), by_doc(reference, "asympo_sums_mc")
    for a, b in zip(ours, theirs, strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"], strict=True):
            assert ll_a == pytest.approx(ll_b, abs=TOLERANCE)
            assert greedy_a == greedy_b
    worst = max(
        abs(x[0] - y[0])
        for a, b in zip(ours, theirs, strict=True)
        for x, y in zip(a["filtered_resps"], b["filtered_resps"], strict=True)
    )
    acc = result["results"]["asympo_sums_mc"]["acc,none"]
    exact = result["results"]["asympo_sums_gen"]["exact_match,none"]
    print(
        f"\nlm-eval {tokenized=}: exact_match {exact:.3f} ({cut} cut by stops), acc {acc:.3f}, "
        f"largest log-likelihood gap to hf {worst:.2e}"
    )
    assert acc == reference["results"]["asympo_sums_mc"]["acc,none"]
    assert acc > 0.3  # the tiny model is better than chance (0.25) at these sums: real scores, not noise


def test_local_chat_completions_generates_exactly_as_hf_with_the_chat_template(
    server, model_and_tokenizer, tasks
):
    _, tokenizer = model_and_tokenizer
    theirs = evaluate(hf(model_and_tokenizer), tasks, ["asympo_sums_gen"], chat=True)
    lm = api("local-chat-completions", server, tokenizer, tokenizer_backend=None, tokenized_requests=False)
    ours = evaluate(lm, tasks, ["asympo_sums_gen"], chat=True)
    a, b = by_doc(ours, "asympo_sums_gen"), by_doc(theirs, "asympo_sums_gen")
    assert [s["filtered_resps"] for s in a] == [s["filtered_resps"] for s in b]
    assert ours["results"]["asympo_sums_gen"] == theirs["results"]["asympo_sums_gen"]
    assert "user: " in str(b[0]["arguments"]), "the chat template was not applied"
