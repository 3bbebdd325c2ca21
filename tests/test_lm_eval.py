"""lm-evaluation-harness on a `mixattn export-hf` folder and on `mixattn
serve` (collected only where lm_eval is importable: `make test-lmeval` builds
its own environment, since lm-eval's transformers 5 conflicts with the main
suite's pin).

The harness loads the export through its `hf` model (AutoModelForCausalLM,
trust_remote_code), or talks to the server through its `local-completions`
model (token-id prompts, echo, logprobs; the server's own tokenizer through
/tokenize), runs a local multiple-choice task in its YAML format, and its
per-choice log-likelihoods equal the ones the native model computes."""

import json

import pytest
import torch
from lm_eval import simple_evaluate  # tests/conftest.py collects this file only where lm_eval is installed
from lm_eval.tasks import TaskManager

from mixattn.data import train_tokenizer
from mixattn.demo import stdlib_corpus
from mixattn.hf import export_model
from mixattn.model import MixAttentionLM, ModelConfig

QUESTIONS = [("def add(a, b):\n    return", [" a + b", " a - b", " None"]),
             ("import", [" os", " sys.path", " (("]),
             ("for i in", [" range(10):", " 10", " ]"]),
             ("class Foo", ["(object):", " = 3", " def"])]


def _task(folder):
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": 0}) + "\n" for q, c in QUESTIONS))
    (folder / "toy_mc.yaml").write_text(f"""task: mixattn_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")


def _native_loglikelihood(model, encode, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval computes it: encode context +
    continuation whole, the continuation is what follows the context's tokens."""
    whole = encode(context + continuation)
    n_ctx = len(encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_lm_eval_scores_an_export_with_the_native_log_likelihoods(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok_path = train_tokenizer(stdlib_corpus()[:20], tmp_path / "tok", vocab_size=512)
    torch.manual_seed(0)
    model = MixAttentionLM(ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, max_seq_len=128, plan="ma",
                                       window=8)).eval()
    out = export_model(model, tmp_path / "hf", tokenizer=tok_path)
    (tmp_path / "tasks").mkdir()
    _task(tmp_path / "tasks")

    results = simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
                              tasks=["mixattn_toy_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                              device="cpu", batch_size=2, log_samples=True)
    samples = results["samples"]["mixattn_toy_mc"]
    assert len(samples) == len(QUESTIONS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # the export's tokenizer (tests/test_export.py: it encodes as ours)
    correct = 0
    for s in samples:
        question, choices = QUESTIONS[s["doc_id"]]
        harness = [r[0][0] for r in s["resps"]]  # per choice: (loglikelihood, is_greedy)
        native = [_native_loglikelihood(model, lambda t: tok(t, add_special_tokens=False)["input_ids"], question, c)
                  for c in choices]
        assert harness == pytest.approx(native, rel=1e-4, abs=1e-4), (question, harness, native)
        correct += int(max(range(len(native)), key=native.__getitem__) == 0)
    assert results["results"]["mixattn_toy_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))


def test_lm_eval_scores_a_served_model_through_local_completions(tmp_path, monkeypatch):
    from _uvicorn_thread import ThreadedServer
    from mixattn.data import load_tokenizer
    from mixattn.engine import Engine
    from mixattn.serve import create_app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok_path = train_tokenizer(stdlib_corpus()[:20], tmp_path / "tok", vocab_size=512)
    tok = load_tokenizer(tok_path)
    torch.manual_seed(0)
    model = MixAttentionLM(ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, max_seq_len=128, plan="ma_offset",
                                       window=8)).eval()
    (tmp_path / "tasks").mkdir()
    _task(tmp_path / "tasks")
    app = create_app(Engine(model, max_slots=3, max_context=128, chunk_size=4), tok, "toy")  # chunks of 4: rings wrap
    with ThreadedServer(app) as server:
        results = simple_evaluate(
            model="local-completions", model_args=f"model=toy,base_url={server.url}/v1/completions,"
                                                  "tokenizer_backend=remote,num_concurrent=3,max_length=128",
            tasks=["mixattn_toy_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")), log_samples=True)
    samples = results["samples"]["mixattn_toy_mc"]
    assert len(samples) == len(QUESTIONS)
    for s in samples:
        question, choices = QUESTIONS[s["doc_id"]]
        harness = [r[0][0] for r in s["resps"]]
        native = [_native_loglikelihood(model, lambda t: tok.encode_batch([t])[0], question, c) for c in choices]
        assert harness == pytest.approx(native, rel=1e-4, abs=1e-4), (question, harness, native)
