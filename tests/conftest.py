import os

import pytest
import torch

# GPU tests live in tests/gpu and are collected only where CUDA exists (the
# device machine: `make test-gpu`); on the CPU they are not collected rather
# than skipped.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]
if not torch.cuda.is_available():
    # the Triton decode kernel (mixattn.decode_kernel) runs on the CPU only in Triton's
    # interpreter, which must be chosen before anything imports triton (composer does)
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the llm-foundry plugin's checks against llm-foundry itself need it installed
# (`make test-foundry` installs it and runs them); elsewhere they are not collected
try:
    import importlib.util

    _has_foundry = importlib.util.find_spec("llmfoundry") is not None
except ValueError:
    _has_foundry = False
if not _has_foundry:
    collect_ignore_glob.append("test_foundry.py")
# lm-evaluation-harness on an export needs lm_eval (`make test-lmeval`, its own environment)
if importlib.util.find_spec("lm_eval") is None:
    collect_ignore_glob.append("test_lm_eval.py")

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_wandb_session():
    """wandb keeps one session per process and ignores later WANDB_* changes
    (WANDB_DIR of the next test): end it after every test that started one."""
    yield
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.fixture(scope="session")
def make_corpus(tmp_path_factory):
    """make_corpus(name, n_files, vocab_size, seq_lens, val_fraction) -> a folder
    with tok/tokenizer.json (BPE trained on the first n_files stdlib modules) and
    one MDS dataset mds{T} per sequence length T."""
    from mixattn.data import convert_to_mds, load_tokenizer, train_tokenizer
    from mixattn.demo import stdlib_corpus

    def make(name, n_files, vocab_size, seq_lens, val_fraction):
        root = tmp_path_factory.mktemp(name)
        files = stdlib_corpus()[:n_files]
        tok = load_tokenizer(train_tokenizer(files, root / "tok", vocab_size=vocab_size))
        for t in seq_lens:
            convert_to_mds(files, root / f"mds{t}", tok, t, val_fraction=val_fraction, progress=False)
        return root

    return make


@pytest.fixture(scope="session")
def corpus(make_corpus):
    """The training tests' shared corpus: 30 stdlib modules, a 512-token BPE,
    MDS at 64 and 128 tokens with a 10% validation split."""
    return make_corpus("corpus", n_files=30, vocab_size=512, seq_lens=(64, 128), val_fraction=0.1)
