"""RULER-style retrieval tasks: deterministic, the needle where it was asked
to be, the prompt as long as asked, and a scorer that can tell right from wrong."""

import pytest

from mixattn.data import load_tokenizer
from mixattn.demo import stdlib_corpus
from mixattn.retrieval import TASKS, make_sample, make_suite, score


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus / "tok" / "tokenizer.json")


@pytest.fixture(scope="module")
def hay():
    return "".join(p.read_text() for p in stdlib_corpus()[:3])


@pytest.mark.parametrize("task", sorted(TASKS.names()))
def test_samples_are_deterministic_and_as_long_as_asked(task, tok, hay):
    a = make_sample(task, tok, hay, 1000, 0.5, seed=3)
    b = make_sample(task, tok, hay, 1000, 0.5, seed=3)
    c = make_sample(task, tok, hay, 1000, 0.5, seed=4)
    assert a == b and a.prompt != c.prompt
    assert a.context_tokens == len(a.prompt_ids) and 960 <= a.context_tokens <= 1000
    for answer in a.answers:
        assert answer in a.prompt  # every answer is in the context
    assert score(a, " ".join(a.answers)) == 1.0
    assert score(a, "I do not know.") == 0.0


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_the_needle_sits_at_the_requested_depth(depth, tok, hay):
    s = make_sample("niah_single", tok, hay, 2000, depth, seed=1)
    assert s.context_tokens == 2000
    (start,) = s.needle_token_starts
    question = len(tok.encode_batch(["\n\n" + s.prompt.rsplit("\n\n", 1)[1]])[0])
    needle = len(tok.encode_batch([" " + "One of the special magic numbers for x is: 1234567." + " "])[0])
    haystack = s.context_tokens - question - needle
    assert abs(start - depth * haystack) <= 0.005 * s.context_tokens, (start, depth * haystack)  # within 10 tokens
    assert tok.decode(s.prompt_ids[start: start + 40]).lstrip().startswith("One of the special magic numbers")


def test_multi_answer_tasks_score_partially(tok, hay):
    s = make_sample("niah_multivalue", tok, hay, 1500, 0.2, seed=0)
    assert len(s.answers) == 4 and len(s.needle_token_starts) == 4
    assert score(s, f"{s.answers[0]} and {s.answers[2]}") == 0.5
    v = make_sample("variable_tracking", tok, hay, 1500, 0.3, seed=0)
    assert len(v.answers) == 5 and f"VAR {v.answers[1]} = VAR {v.answers[0]}." in v.prompt
    w = make_sample("word_frequency", tok, hay, 800, 0.0, seed=0)
    counts = {a: w.prompt.count(f". {a}\n") for a in w.answers}
    others = [line.split(". ", 1)[1] for line in w.prompt.splitlines() if ". " in line and line[0].isdigit()]
    top_other = max((others.count(x) for x in set(others) - set(w.answers)), default=0)
    assert min(counts.values()) > top_other


def test_suite_covers_the_grid(tok, hay):
    suite = make_suite(["niah_single", "niah_multikey"], tok, hay, [500, 1000], [0.0, 0.5, 1.0], samples_per_cell=2)
    assert len(suite) == 2 * 2 * 3 * 2
    assert len({s.prompt for s in suite}) == len(suite)


def test_bad_requests(tok, hay):
    with pytest.raises(ValueError, match="depth must be in \\[0, 1\\], got 1.5"):
        make_sample("niah_single", tok, hay, 1000, 1.5, seed=0)
    with pytest.raises(ValueError, match="leaves no room for the haystack"):
        make_sample("niah_single", tok, hay, 20, 0.5, seed=0)
    with pytest.raises(ValueError, match="the haystack text has .* tokens but .* are needed"):
        make_sample("niah_single", tok, "short text", 1000, 0.5, seed=0)
    with pytest.raises(KeyError, match="niah_nope"):
        make_sample("niah_nope", tok, hay, 1000, 0.5, seed=0)


def test_evaluate_runs_the_model_on_each_sample(tok, hay):
    import torch

    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.retrieval import evaluate

    torch.manual_seed(0)
    model = MixAttentionLM(ModelConfig(vocab_size=512, d_model=32, n_layers=4, n_heads=4, max_seq_len=640, plan="ma", window=32))
    suite = make_suite(["niah_single", "niah_multivalue"], tok, hay, [300, 600], [0.0, 1.0])
    records = evaluate(model, tok, suite, max_new_tokens=8, batch_size=3)
    assert len(records) == len(suite)
    for s, r in zip(suite, records):
        assert (r["task"], r["context_tokens"], r["depth"]) == (s.task, s.context_tokens, s.depth)
        assert r["score"] == score(s, r["output"]) and 0 <= r["score"] <= 1


def test_evaluate_decodes_with_an_eager_step_unless_told(tok, hay, monkeypatch):
    """A suite is many short generations at many cache sizes: by default no
    compiled step or CUDA graph (one per cache size would cost more than it
    saves); a given DecodePath is the one used."""
    import torch

    import mixattn.generate as gen
    from mixattn.model import MixAttentionLM, ModelConfig
    from mixattn.retrieval import evaluate

    seen = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, decode=None, **k: seen.append(decode) or real(*a, decode=decode, **k))
    torch.manual_seed(0)
    model = MixAttentionLM(ModelConfig(vocab_size=512, d_model=32, n_layers=4, n_heads=4, max_seq_len=640, plan="ma", window=32))
    suite = make_suite(["niah_single"], tok, hay, [300], [0.5])
    default = evaluate(model, tok, suite, max_new_tokens=4)
    assert seen and all(d is not None and not d.compile and not d.cuda_graph for d in seen)
    mine = gen.DecodePath.resolve("cpu", attention="sdpa")
    again = evaluate(model, tok, suite, max_new_tokens=4, decode=mine)
    assert seen[-1] is mine and [r["output"] for r in again] == [r["output"] for r in default]
