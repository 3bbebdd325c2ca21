"""`mixattn data --format longqa`: synthetic long-context QA sequences with
the loss on the answers only (the paper's stage 3)."""

import numpy as np
import pytest

from mixattn.cli import main
from mixattn.data import DataError, convert_longqa_to_mds, load_tokenizer
from mixattn.retrieval import TASKS, make_suite, qa_examples


@pytest.fixture(scope="module")
def tok(corpus):
    return load_tokenizer(corpus / "tok" / "tokenizer.json")


def _hay(corpus):
    from mixattn.demo import stdlib_corpus

    return stdlib_corpus()[:30]  # the files the corpus fixture's tokenizer was trained on


def test_examples_are_exact_length_with_the_answer_last(corpus, tok):
    hay = tok.encode_batch(["\n\n".join(p.read_text() for p in _hay(corpus))])[0]
    examples = list(qa_examples(tok, hay, 512, 10, seed=3))
    assert len(examples) == 10
    for i, (prompt, answer) in enumerate(examples):
        assert len(prompt) + len(answer) == 512 and answer[-1] == tok.eos_id
        assert tok.eos_id not in prompt[prompt.index(next(t for t in prompt if t != tok.eos_id)):]  # one document
        task = TASKS.names()[i % len(TASKS.names())]
        assert tok.decode(answer[:-1]).strip() and task
    # the answers are what the question asks: niah_single's number occurs in the haystack's facts
    prompt, answer = examples[0]
    assert tok.decode(answer[:-1]).strip() in tok.decode(prompt)
    assert examples == list(qa_examples(tok, hay, 512, 10, seed=3))  # deterministic
    assert examples != list(qa_examples(tok, hay, 512, 10, seed=4))


def test_training_samples_never_repeat_evaluation_samples(corpus, tok):
    text = "\n\n".join(p.read_text() for p in _hay(corpus))
    hay = tok.encode_batch([text])[0]
    train_answers = {tok.decode(a[:-1]).strip() for _, a in qa_examples(tok, hay, 384, 40, tasks=["niah_single"], seed=0)}
    eval_answers = {s.answers[0] for s in make_suite(["niah_single"], tok, text, [384], [0.0, 0.5, 1.0], 10, seed=0)}
    assert not train_answers & eval_answers


def test_cli_writes_answer_only_loss_masks_that_the_trainer_reads(corpus, tok, tmp_path):
    from streaming import StreamingDataset

    from mixattn.data import collate

    out = tmp_path / "qa"
    assert main(["data", *map(str, _hay(corpus)), "--out", str(out), "--tokenizer", str(corpus / "tok"), "--max-seq-len", "512",
                 "--format", "longqa", "--samples", "12", "--val-fraction", "0"]) == 0
    ds = StreamingDataset(local=str(out / "train"), shuffle=False, batch_size=1)
    assert len(ds) == 12
    sample = ds[0]
    tokens, mask = np.asarray(sample["tokens"]), np.asarray(sample["loss_mask"]).astype(bool)
    assert tokens.shape == (512,) and mask[-1] and mask.sum() < 40
    assert mask[np.argmax(mask):].all()  # the loss covers one stretch at the end: the answer and its EOS
    batch = collate([sample], eos_id=tok.eos_id)
    assert (batch["labels"][0][~mask] == -100).all() and (batch["labels"][0][mask] >= 0).all()


def test_bad_longqa_input_is_named(corpus, tok, tmp_path):
    with pytest.raises(DataError, match="unknown task 'niah' for --format longqa; valid: niah_single"):
        convert_longqa_to_mds(_hay(corpus), tmp_path / "a", tok, 256, tasks=["niah"])
    with pytest.raises(DataError, match=r"the haystack text has \d+ tokens; --format longqa at max_seq_len=10000000 needs"):
        convert_longqa_to_mds(_hay(corpus)[:1], tmp_path / "b", tok, 10_000_000)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
