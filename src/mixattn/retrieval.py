"""Long-context retrieval tasks in the style of RULER (Hsieh et al., 2024),
generated locally and deterministically from any text corpus.

Each sample is a prompt of ``context_tokens`` tokens (haystack text with the
task's facts inserted at a relative ``depth`` in token space) followed by a
question, plus the answers a correct completion contains. ``score`` is
RULER's string match: the fraction of answers found in the output.

Tasks (a registry: add your own with ``TASKS.register``):
  niah_single      one "special magic number" needle; recall its value
  niah_multikey    four needles with different keys; recall one key's value
  niah_multivalue  four values under one key; recall all of them
  variable_tracking a chain VAR A = n, VAR B = VAR A, ...; name every variable holding n
  word_frequency   a word list where three words recur; name the three
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mixattn.registry import Registry

KEY_WORDS = (
    "apple anchor basil breeze cactus candle cedar comet copper dolphin ember falcon fern garnet glacier harbor hazel "
    "island jasper kettle lantern lemon maple marble meadow nectar oasis orchid otter pepper pebble quartz raven river "
    "saffron sage sparrow spruce tiger timber tulip velvet violet walnut willow zephyr"
).split()


@dataclass
class Sample:
    task: str
    prompt: str
    answers: list[str]
    depth: float
    context_tokens: int  # tokens of the prompt (haystack + facts + question)
    length: int  # the requested context length (word_frequency may come out a few tokens shorter)
    needle_token_starts: list[int] = field(default_factory=list)  # token offsets of the inserted facts
    prompt_ids: list[int] = field(default_factory=list, repr=False)  # feed these to the model (no re-tokenization)


@dataclass(frozen=True)
class TaskSpec:
    facts: Callable[[random.Random], tuple[list[str], str, list[str]]]  # rng -> (facts, question, answers)
    haystack: str = "text"  # "text": the corpus; "words": the task builds its own filler (word_frequency)


TASKS: Registry[TaskSpec] = Registry("retrieval task")


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _niah_single(rng):
    key, value = rng.choice(KEY_WORDS), _number(rng)
    q = f"What is the special magic number for {key} mentioned in the provided text? The special magic number for {key} is"
    return [f"One of the special magic numbers for {key} is: {value}."], q, [value]


def _niah_multikey(rng):
    keys = rng.sample(KEY_WORDS, 4)
    values = [_number(rng) for _ in keys]
    asked = rng.randrange(4)
    facts = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    q = (f"What is the special magic number for {keys[asked]} mentioned in the provided text? "
         f"The special magic number for {keys[asked]} is")
    return facts, q, [values[asked]]


def _niah_multivalue(rng):
    key = rng.choice(KEY_WORDS)
    values = [_number(rng) for _ in range(4)]
    q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
         f"The special magic numbers for {key} are")
    return [f"One of the special magic numbers for {key} is: {v}." for v in values], q, values


def _variable_tracking(rng):
    names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
    value = str(rng.randint(10_000, 99_999))
    facts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    q = f"Find all variables that are assigned the value {value} in the text above. Answer: the variables are"
    return facts, q, names


def _word_frequency(rng):
    common = rng.sample(KEY_WORDS, 3)
    q = "What are the 3 most common words in the numbered list above? Answer: the top 3 words are"
    return common, q, common


TASKS.register("niah_single", TaskSpec(_niah_single))
TASKS.register("niah_multikey", TaskSpec(_niah_multikey))
TASKS.register("niah_multivalue", TaskSpec(_niah_multivalue))
TASKS.register("variable_tracking", TaskSpec(_variable_tracking))
TASKS.register("word_frequency", TaskSpec(_word_frequency, haystack="words"))


def make_sample(task: str, tokenizer, haystack: str | Sequence[int], context_tokens: int, depth: float, seed: int) -> Sample:
    """One sample of ``task`` whose prompt is ``context_tokens`` tokens long (to
    within a few tokens of re-tokenization at the joins), its facts starting at
    ``depth`` (0 = the beginning of the haystack, 1 = its end) and spread over
    the following stretch when there are several. Deterministic in ``seed``.
    ``haystack`` is text, or its token ids (encode once for many samples)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    spec = TASKS.get(task)
    rng = random.Random(f"{task}:{seed}")
    facts, question, answers = spec.facts(rng)
    encode = lambda text: tokenizer.encode_batch([text])[0]  # noqa: E731
    q_ids = encode("\n\n" + question)
    if spec.haystack == "words":
        fill_ids = _word_list(encode, rng, facts, context_tokens - len(q_ids))
        starts = []
    else:
        fact_ids = [encode(" " + f + " ") for f in facts]
        budget = context_tokens - len(q_ids) - sum(len(f) for f in fact_ids)
        hay = encode(haystack) if isinstance(haystack, str) else haystack
        if budget <= 0:
            raise ValueError(f"context_tokens={context_tokens} leaves no room for the haystack; use a longer context")
        if len(hay) < budget:
            raise ValueError(f"the haystack text has {len(hay)} tokens but {budget} are needed; give more text")
        offset = rng.randrange(0, len(hay) - budget + 1)
        fill_ids = hay[offset: offset + budget]
        at = round(depth * budget)
        # several facts are spread evenly from the depth to the end of the haystack
        gaps = [at + round(i * (budget - at) / len(fact_ids)) for i in range(len(fact_ids))]
        ids, starts, prev = [], [], 0
        for gap, f in zip(gaps, fact_ids):
            ids.extend(fill_ids[prev:gap])
            starts.append(len(ids))
            ids.extend(f)
            prev = gap
        ids.extend(fill_ids[prev:])
        fill_ids = ids
    prompt_ids = fill_ids + q_ids
    return Sample(task=task, prompt=tokenizer.decode(prompt_ids), answers=list(answers), depth=depth,
                  context_tokens=len(prompt_ids), length=context_tokens, needle_token_starts=starts, prompt_ids=prompt_ids)


def _word_list(encode, rng: random.Random, common: list[str], budget: int):
    """A numbered word list of about ``budget`` tokens in which the words in
    ``common`` each appear far more often than any other."""
    others = [w for w in KEY_WORDS if w not in common]
    words: list[str] = []
    ids: list[int] = []
    n = 0
    while True:
        w = common[n % 3] if n % 4 == 0 else rng.choice(others) + str(rng.randint(10, 99))
        piece = encode(f"{len(words) + 1}. {w}\n")
        if len(ids) + len(piece) > budget:
            break
        words.append(w)
        ids.extend(piece)
        n += 1
    if not words:
        raise ValueError("context too short for a word list; use a longer context")
    return ids


def score(sample: Sample, output: str) -> float:
    """RULER's string match: the fraction of ``sample.answers`` that occur in
    ``output`` (case-insensitive)."""
    low = output.lower()
    return sum(a.lower() in low for a in sample.answers) / len(sample.answers)


def make_suite(tasks: Sequence[str], tokenizer, haystack: str, lengths: Sequence[int], depths: Sequence[float],
               samples_per_cell: int = 1, seed: int = 0) -> list[Sample]:
    """Every (task, length, depth) cell, ``samples_per_cell`` samples each."""
    hay_ids = tokenizer.encode_batch([haystack])[0]  # once, not per sample
    return [make_sample(t, tokenizer, hay_ids, n, d, seed * 100_003 + i)
            for t in tasks for n in lengths for d in depths for i in range(samples_per_cell)]


def evaluate(model, tokenizer, samples: Sequence[Sample], max_new_tokens: int = 24, batch_size: int = 4,
             decode=None) -> list[dict]:
    """Greedy completions of every sample with the plan-shaped cache; one
    record per sample (task, length, depth, score, output). ``decode`` (a
    :class:`~mixattn.generate.DecodePath`) defaults to the device's path with
    an eager step outside CUDA graphs: a suite is many generations of a few
    tokens at many cache sizes, and the default generation path compiles and
    captures its step per cache size, which costs far more than the few
    steps it would speed up."""
    from mixattn.generate import DecodePath, generate

    if decode is None:
        decode = DecodePath.resolve(model.embed.weight.device, compile=False, cuda_graph=False)
    records = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i: i + batch_size]
        out = generate(model, [s.prompt_ids for s in batch], max_new_tokens, stop_tokens=[tokenizer.eos_id], decode=decode)
        for s, new in zip(batch, out.tokens):
            text = tokenizer.decode(new)
            records.append({"task": s.task, "length": s.length, "context_tokens": s.context_tokens, "depth": s.depth,
                            "score": score(s, text), "output": text})
    return records


# -- training data: long-context QA exercises (the paper's stage 3) ----------------------

# Training samples draw seeds from here up, evaluation (make_suite) from
# seed * 100_003 + i: a training sample never repeats an evaluation sample.
TRAIN_SEED_BASE = 10**12

# RULER's categories among TASKS
KINDS = {"retrieval": ("niah_single", "niah_multikey", "niah_multivalue"), "multi-hop": ("variable_tracking",),
         "aggregation": ("word_frequency",)}


def qa_examples(tokenizer, haystack_ids: Sequence[int], seq_len: int, n: int, tasks: Sequence[str] = tuple(TASKS.names()),
                seed: int = 0):
    """``n`` exercises (prompt ids, answer ids) of exactly ``seq_len`` tokens
    with the answer's EOS: (EOS padding of a few tokens, if any, then) a
    haystack with a
    task's facts at a uniformly random depth, its question, then the answer
    (the task's answers joined by ', ') and EOS. Tasks cycle in order;
    deterministic in ``seed``; seeds disjoint from evaluation's
    (``TRAIN_SEED_BASE``)."""
    rng = random.Random(f"qa:{seed}")
    for i in range(n):
        task = tasks[i % len(tasks)]
        sample_seed = TRAIN_SEED_BASE + seed * 100_003 + i
        depth = rng.random()
        probe = make_sample(task, tokenizer, haystack_ids, seq_len, depth, sample_seed)  # its answers (the seed fixes them)
        answer = tokenizer.encode_batch([" " + ", ".join(probe.answers)])[0] + [tokenizer.eos_id]
        target = seq_len - len(answer)
        for _ in range(4):  # re-tokenization at the joins moves the length by a few tokens
            sample = make_sample(task, tokenizer, haystack_ids, target, depth, sample_seed)
            over = len(sample.prompt_ids) + len(answer) - seq_len
            if over <= 0:
                break
            target -= over
        # a few tokens short: EOS padding in front (its own documents, masked), so the
        # haystack, question and answer stay one document under document masks
        yield [tokenizer.eos_id] * (-over) + sample.prompt_ids, answer
