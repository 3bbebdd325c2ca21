"""ICL tasks from JSONL: log-likelihood scoring equals a direct computation,
accuracy and exact match count what they should on hand-made examples, few-shot
prompts are built as documented, bad files are refused with file and line."""

import json
import random

import pytest
import torch

from mixattn.cli import main
from mixattn.data import load_tokenizer
from mixattn.generate import generate
from mixattn.icl import Example, ICLError, _prompt, evaluate_task, load_task, loglikelihoods
from mixattn.model import MixAttentionLM, ModelConfig
from test_generate_cli import trained  # noqa: F401  (the module-scoped trained checkpoint)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # untied: a random tied model greedily repeats its last token, too dull for the generation test
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=4, n_heads=4, max_seq_len=48, plan="ma", window=8, tie_embeddings=False)
    return MixAttentionLM(cfg).eval()


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus / "tok" / "tokenizer.json")


def _direct(model, ctx, cont):
    ids = (ctx + cont)[-model.cfg.max_seq_len:]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(cont)
    return float(sum(logp[len(ids) - n - 1 + k, cont[k]] for k in range(n)))


def test_loglikelihoods_equal_a_direct_computation(model):
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(0, 512, (n,), generator=g).tolist()
    pairs = [(rand(5), rand(3)), (rand(20), rand(1)), (rand(60), rand(4)), (rand(1), rand(7))]  # the third is cut from the left
    got = loglikelihoods(model, pairs, batch_size=3)
    for (ctx, cont), value in zip(pairs, got):
        assert value == pytest.approx(_direct(model, ctx, cont), abs=1e-4)


def test_multiple_choice_accuracy_counts_the_argmax(model, tok):
    contexts = ["def add(a, b):\n    return", "import os\nprint(os.", "for i in range(", "class Foo"]
    choices = [" a + b", " path", "10):", "(object):"], [" None", " getcwd())", "x", ":"]
    examples = []
    for n, ctx in enumerate(contexts):
        ch = [choices[0][n], choices[1][n]]
        ctx_ids = tok.encode_batch([ctx])[0]
        ll = [_direct(model, ctx_ids, tok.encode_batch([c])[0]) for c in ch]
        best = max(range(2), key=ll.__getitem__)
        examples.append(Example("mc", ctx, choices=ch, answer=best if n % 2 == 0 else 1 - best))  # half right, half wrong
    result = evaluate_task(model, tok, examples)
    assert result["acc"] == 0.5
    for rec, ex in zip(result["records"], examples):
        norm = [s / len(c) for s, c in zip(rec["loglikelihoods"], ex.choices)]
        assert rec["acc_norm"] == float(max(range(2), key=norm.__getitem__) == ex.answer)


def test_generation_exact_match_with_stop_strings(model, tok):
    prompt = "def main():\n"
    ids = tok.encode_batch([prompt])[0]
    out = generate(model, [ids], 10, stop_tokens=[tok.eos_id]).tokens[0]
    text = tok.decode([t for t in out if t != tok.eos_id])
    stop = next(ch for ch in text.strip()[1:] if ch != text.strip()[0])  # a stop string inside the output
    head = text.split(stop, 1)[0]
    assert head.strip() and head.strip() != text.strip()
    examples = [Example("gen", prompt, answers=[text], stop=[]), Example("gen", prompt, answers=["no such output"], stop=[]),
                Example("gen", prompt, answers=[head], stop=[stop]), Example("gen", prompt, answers=[text], stop=[stop])]
    result = evaluate_task(model, tok, examples, max_new_tokens=10)
    assert [r["exact_match"] for r in result["records"]] == [1.0, 0.0, 1.0, 0.0]  # the stop cuts the output short
    assert result["exact_match"] == 0.5


def test_few_shot_prompt_is_shots_then_the_example():
    ex = [Example("mc", f"q{i}:", choices=[" a", " b"], answer=i % 2) for i in range(5)]
    p = _prompt(ex, 2, 2, "\n\n", random.Random(0))
    parts = p.split("\n\n")
    assert len(parts) == 3 and parts[-1] == "q2:"
    assert all(part in {e.demonstration() for j, e in enumerate(ex) if j != 2} for part in parts[:2])
    assert _prompt(ex, 2, 2, "\n\n", random.Random(0)) == p  # seeded
    with pytest.raises(ICLError, match="shots=5 needs at least 6 examples in the file, it has 5"):
        _prompt(ex, 0, 5, "\n\n", random.Random(0))


@pytest.mark.parametrize("line,message", [
    ('{"type": "mc", "context": "x", "choices": [" a", " b"]}', "missing field 'answer'"),
    ('{"type": "mc", "context": "x", "choices": [" a", " b"], "answer": 2}', r"answer 2 is not an index of the 2 choices \(0..1\)"),
    ('{"type": "mc", "context": "x", "choices": [" a"], "answer": 0}', "'choices' must be a list of at least 2 non-empty strings"),
    ('{"type": "gen", "prompt": "x", "answers": "4"}', "field 'answers' must be list"),
    ('{"type": "cloze", "context": "x"}', "'type' must be 'mc' or 'gen', got 'cloze'"),
    ('{"type": "gen", "prompt": "x", "answers": ["4"], "stop": [""]}', "'stop' must be a list of non-empty strings"),
    ("not json", "not JSON"),
])
def test_bad_task_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"type": "gen", "prompt": "1+1=", "answers": ["2"]}\n' + line + "\n")
    with pytest.raises(ICLError, match=f"task.jsonl:2: {message}"):
        load_task(path)


def test_cli_scores_task_files(trained, corpus, tmp_path, capsys):  # noqa: F811
    path, _ = trained
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"type": "mc", "context": f"x = {i}\ny =", "choices": [" 1", " x", " None"], "answer": i % 3})
                            for i in range(6)) + "\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"type": "gen", "prompt": p, "answers": [" os"], "stop": ["\n"]}) + "\n" for p in ("import", "from")))
    out = tmp_path / "icl.json"
    assert main(["eval", "icl", str(path), "--tokenizer", str(corpus / "tok" / "tokenizer.json"), "--tasks", str(mc), str(gen),
                 "--shots", "1", "--max-new-tokens", "8", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["tasks"]
    assert result["mc"]["examples"] == 6 and result["mc"]["shots"] == 1 and len(result["mc"]["records"]) == 6
    assert result["mc"]["acc"] == sum(r["acc"] for r in result["mc"]["records"]) / 6
    assert set(result["gen"]) >= {"exact_match", "records"} and "acc" not in result["gen"]
    assert "exact_match" in capsys.readouterr().out
    assert main(["eval", "icl", str(path), "--tokenizer", str(corpus / "tok" / "tokenizer.json"), "--tasks",
                 str(tmp_path / "missing.jsonl")]) == 2
