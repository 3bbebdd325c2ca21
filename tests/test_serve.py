"""`mixattn serve` through the official openai client (issue #18): concurrent
requests, streaming, stop strings of several tokens, cancellation, bad
requests named by field, chat completions with a chat template."""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from _uvicorn_thread import ThreadedServer
from mixattn.checkpoint import load_model
from mixattn.data import EOS_TOKEN, load_tokenizer
from mixattn.detokenize import TextStream
from mixattn.engine import Engine, Request
from mixattn.generate import decode_step, generate
from mixattn.serve import create_app
from test_train import _cfg, _fit

MODEL = "tiny"


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    _fit(_cfg(corpus, tmp, "max_duration=4ba", "model.plan=ma_offset"))
    path = tmp / "ckpt" / "latest-rank0.pt"
    return path, load_model(path), load_tokenizer(corpus / "tok" / "tokenizer.json")


class Server(ThreadedServer):
    """The server in a thread, with an openai client for it."""

    def __enter__(self):
        super().__enter__()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)
        return self


def _reference_ids(model, tok, prompt, max_tokens):
    """The tokens one request alone should get (generate, stopping at EOS)."""
    ids = tok.encode_batch([prompt])[0]
    return generate(model, [ids], max_tokens, stop_tokens=[tok.eos_id], chunk_size=512).tokens[0]


def _reference(model, tok, prompt, max_tokens, stops=()):
    """What one request alone should give: its tokens, then the text up to EOS or a stop string."""
    out = _reference_ids(model, tok, prompt, max_tokens)
    text = TextStream(tok, stops)
    pieces = []
    for t in out:
        if t == tok.eos_id:
            break
        pieces.append(text.push(t))
        if text.stopped:
            break
    return "".join(pieces) + text.finish(), ("stop" if text.stopped or out[-1] == tok.eos_id else "length")


@pytest.fixture(scope="module")
def server(trained):
    _, model, tok = trained
    with Server(create_app(Engine(model, max_slots=2, max_context=64, chunk_size=16), tok, MODEL)) as s:
        yield s


PROMPTS = ["def f(x):", "import os\n", "class A:\n    ", "for i in range(", "return self.", "x = [", "if __name__"]


def test_concurrent_requests_each_equal_generate_alone(server, trained):
    _, model, tok = trained
    ask = lambda p: server.client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # 7 requests for 2 rows: the rest wait their turn
        answers = list(pool.map(ask, PROMPTS))
    for p, a in zip(PROMPTS, answers):
        text, reason = _reference(model, tok, p, 12)
        assert a.choices[0].text == text and a.choices[0].finish_reason == reason, p
        assert a.usage.prompt_tokens == len(tok.encode_batch([p])[0]) and a.model == MODEL
    stats = server.get("/stats")
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["finished"] >= len(PROMPTS)


def test_streaming_gives_the_same_text_piece_by_piece(server, trained):
    _, model, tok = trained
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True))
    text, reason = _reference(model, tok, PROMPTS[0], 16)
    assert "".join(c.choices[0].text for c in chunks) == text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == reason and all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_a_stop_string_of_several_tokens(server, trained):
    _, model, tok = trained
    free, _ = _reference(model, tok, PROMPTS[1], 20)
    stop = next(free[i:i + 3] for i in range(1, len(free) - 3) if len(tok.encode_batch([free[i:i + 3]])[0]) >= 2)
    for stream in (False, True):
        r = server.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop, "zzzq"],
                                             stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(c.choices[0].text for c in chunks) == free.split(stop, 1)[0]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_client_that_leaves_a_stream_cancels_its_request(trained):
    _, model, tok = trained

    def slow(*args):  # slow steps, so the request is still running when the client leaves
        time.sleep(0.05)
        return decode_step(*args)

    with Server(create_app(Engine(model, max_slots=1, max_context=64, chunk_size=16, step_fn=slow), tok, MODEL)) as s:
        stream = s.client.completions.create(model=MODEL, prompt="x", max_tokens=60, temperature=0, stream=True)
        it = iter(stream)
        next(it), next(it)
        stream.close()
        deadline = time.time() + 20
        while s.get("/stats")["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        stats = s.get("/stats")
        assert stats["cancelled"] == 1 and stats["running"] == 0
        r = s.client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=5, temperature=0)  # the row serves again
        assert r.choices[0].text == _reference(model, tok, PROMPTS[2], 5)[0]


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(trained):
    """Not streamed: the client times out (or retries) before the answer; the
    server notices within a poll and frees the row instead of decoding for
    nobody."""
    _, model, tok = trained

    def slow(*args):
        time.sleep(0.1)
        return decode_step(*args)

    with Server(create_app(Engine(model, max_slots=1, max_context=64, chunk_size=16, step_fn=slow), tok, MODEL)) as s:
        impatient = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="x", max_tokens=60, temperature=0)  # 60 steps: 6 s
        deadline = time.time() + 10
        while s.get("/stats")["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        stats = s.get("/stats")
        assert stats["cancelled"] == 1 and stats["running"] == 0 and time.time() < deadline


@pytest.mark.parametrize("kwargs, param, message", [
    ({"prompt": "def " * 80, "max_tokens": 4}, "prompt", r"prompt is \d+ tokens; this model's context is 64 tokens"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", "max_tokens must be a positive integer, got -3"),
    ({"prompt": "x = 1", "max_tokens": 70}, "max_tokens", r"max_tokens can be at most \d+"),
    ({"prompt": "x", "max_tokens": 4, "model": "gpt-4"}, "model", "model 'gpt-4' is not served here; this server serves 'tiny'"),
    ({"prompt": "x", "max_tokens": 4, "temperature": -1}, "temperature", "temperature: Input should be greater than or equal to 0"),
    ({"prompt": "x", "max_tokens": 4, "stop": [""]}, "stop", "stop\\[0\\] is empty"),
    ({"prompt": [5, 9999], "max_tokens": 4}, "prompt", r"prompt has token id 9999 outside the vocabulary \[0, 512\)"),
    ({"prompt": [[5], [6, -1]], "max_tokens": 4}, "prompt[1]", r"prompt\[1\] has token id -1 outside"),
    ({"prompt": "x", "max_tokens": 4, "logit_bias": {"abc": 1}}, "logit_bias", "logit_bias key 'abc' is not a token id"),
    ({"prompt": "x", "max_tokens": 4, "logit_bias": {"5": 300}}, "logit_bias", r"logit_bias\[5\] is 300.0; a bias must be in \[-100, 100\]"),
    ({"prompt": "x", "max_tokens": 4, "best_of": 3}, "best_of", "best_of 3 is not supported here"),
    ({"prompt": "x", "max_tokens": 4, "suffix": "end"}, "suffix", "suffix .* is not supported"),
    ({"prompt": "x", "max_tokens": 4, "n": 0}, "n", "n: Input should be greater than or equal to 1"),
    ({"prompt": "x", "max_tokens": 4, "logprobs": 21}, "logprobs", "logprobs: Input should be less than or equal to 20"),
    ({"prompt": "x", "max_tokens": 4, "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({"prompt": "x", "max_tokens": 4, "stream_options": {"include_usage": True}}, "stream_options", "only for stream: true"),
])
def test_bad_requests_get_a_400_naming_the_field(server, kwargs, param, message):
    import re

    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(**{"model": MODEL, **kwargs})
    assert e.value.status_code == 400
    error = e.value.body if "message" in e.value.body else e.value.body["error"]
    assert error["param"] == param and re.search(message, error["message"]), error


def test_a_malformed_body_gets_a_400(server):
    req = urllib.request.Request(server.url + "/v1/completions", data=b'{"model": "tiny", "prompt": ', method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not valid JSON" in json.loads(e.value.read())["error"]["message"]
    req = urllib.request.Request(server.url + "/v1/completions", data=b'{"prompt": "x"}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "model"


def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client.models.list()] == [MODEL]
    assert server.get("/version")["version"] == importlib.metadata.version("mixattn")


def test_chat_completions_with_a_chat_template(trained, corpus, tmp_path, server):
    from transformers import PreTrainedTokenizerFast

    _, model, tok = trained
    with pytest.raises(openai.BadRequestError, match="no chat template"):  # a plain tokenizer.json has none
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    template = "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}# assistant:"
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=EOS_TOKEN, chat_template=template)
    hf.save_pretrained(tmp_path / "chat-tok")
    chat_tok = load_tokenizer(tmp_path / "chat-tok")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f(x):"}]
    prompt = "# system: be brief\n# user: def f(x):\n# assistant:"
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "f(x):"}]}]
    with Server(create_app(Engine(model, max_slots=2, max_context=64, chunk_size=16), chat_tok, MODEL)) as s:
        r = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        chunks = list(s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True))
        lp = s.client.chat.completions.create(model=MODEL, messages=parts, max_tokens=10, temperature=0, n=2, logprobs=True,
                                              top_logprobs=2)
        lp_chunks = list(s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                          logprobs=True, stream=True))
        for bad, param in [({"response_format": {"type": "json_object"}}, "response_format"), ({"top_logprobs": 2}, "top_logprobs"),
                           ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools")]:
            with pytest.raises(openai.BadRequestError) as e:
                s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **bad)
            assert (e.value.body if "param" in e.value.body else e.value.body["error"])["param"] == param
    text, reason = _reference(model, chat_tok, prompt, 10)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text and chunks[-1].choices[0].finish_reason == reason
    assert [c.message.content for c in lp.choices] == [text, text]  # text parts are joined; greedy choices agree
    ids = chat_tok.encode_batch([prompt])[0]
    new = _reference_ids(model, chat_tok, prompt, 10)
    ref = _native_logprobs(model, ids + new)
    content = lp.choices[1].logprobs.content
    assert [c.token for c in content] == [chat_tok.decode([t]) for t in new]
    assert [c.logprob for c in content] == pytest.approx([ref[len(ids) - 1 + k, t].item() for k, t in enumerate(new)], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5) for c in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    streamed = [e.logprob for c in lp_chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-4)  # one row against two: float sums differ


def test_mixattn_serve_from_the_command_line(trained):
    path, model, tok = trained
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    template = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}<assistant>"
    proc = subprocess.Popen([sys.executable, "-m", "mixattn.cli", "serve", str(path.parent), "--port", str(port), "--device", "cpu",
                             "--max-num-seqs", "2", "--prefill-budget", "64", "--chat-template", template],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MIXATTN_API_KEY": "sk-cli"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0, timeout=30)
        deadline = time.time() + 120
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
                time.sleep(0.3)
        assert name == path.parent.parent.name  # the run's folder (its save folder is ckpt/)
        r = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == _reference(model, tok, PROMPTS[0], 8)[0]
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "def f(x):"}], max_tokens=6,
                                              temperature=0)  # a tokenizer.json has no template: --chat-template's
        assert chat.choices[0].message.content == _reference(model, tok, "<user> def f(x):\n<assistant>", 6)[0]
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "serving " in err and "rows of 64 tokens" in err and "API key required" in err and "(recorded in the checkpoint)" in err


@pytest.mark.parametrize("value, message", [
    ("no/such/template.jinja", "--chat-template no/such/template.jinja: no such file, and not a Jinja template"),
    ("{% for m in messages %}", "the template does not compile"),
])
def test_serve_refuses_a_chat_template_that_is_neither_a_file_nor_a_template(trained, capsys, value, message):
    from mixattn.cli import main

    path, _, _ = trained
    assert main(["serve", str(path), "--device", "cpu", "--chat-template", value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_chat_template_for_a_plain_tokenizer_and_one_that_refuses_messages(trained):
    _, model, tok = trained
    template = ("{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool turns here') }}{% endif %}"
                "# {{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}# assistant:{% endif %}")
    with Server(create_app(Engine(model, max_slots=1, max_context=64, chunk_size=16), tok, MODEL, chat_template=template)) as s:
        r = s.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x = ["}], max_tokens=5,
                                             temperature=0)
        with pytest.raises(openai.BadRequestError, match="no tool turns here"):
            s.client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "1"}], max_tokens=2)
        assert s.get("/tokenizer_info")["chat_template"] == template
    assert r.choices[0].message.content == _reference(model, tok, "# user: x = [\n# assistant:", 5)[0]


@pytest.mark.parametrize("flag", ["--chunk-size", "--prefill-budget"])
def test_serve_refuses_a_chunk_or_prefill_budget_below_one_naming_the_flag(trained, capsys, flag):
    from mixattn.cli import main

    path, _, _ = trained
    assert main(["serve", str(path), "--device", "cpu", flag, "0"]) == 2
    assert f"mixattn serve: error: {flag} 0 must be at least 1 token" in capsys.readouterr().err


def _native_logprobs(model, ids):
    """[len(ids), vocab] log-probabilities of the full forward: position i predicts token i + 1."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_and_logprobs_give_the_models_log_likelihoods_as_lm_eval_reads_them(server, trained):
    """What lm-eval's local-completions sends for a log-likelihood (token ids,
    echo, logprobs=1, max_tokens=1): every prompt token's log-probability and
    the top tokens' equal the full forward's; then logprobs=2 without echo
    over new tokens, and the same streamed."""
    _, model, tok = trained
    ids = tok.encode_batch(["def parse(line):\n    return line.split()"])[0]
    r = server.client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    ref = _native_logprobs(model, ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        best = ref[i - 1].argmax().item()
        assert lp.top_logprobs[i][tok.decode([best])] == pytest.approx(ref[i - 1, best].item(), abs=1e-4)
        assert (max(lp.top_logprobs[i].values()) == lp.token_logprobs[i]) == (best == ids[i])  # lm-eval's is_greedy
    assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)  # greedy: the new token is the best
    assert c.text == tok.decode(ids) + tok.decode([ref[-1].argmax().item()]) and r.usage.prompt_tokens == len(ids)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    plain = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    p_ids = tok.encode_batch([PROMPTS[0]])[0]
    new = [t for t in _reference_ids(model, tok, PROMPTS[0], 6)]
    ref = _native_logprobs(model, p_ids + new)
    got = plain.choices[0].logprobs
    assert got.tokens == [tok.decode([t]) for t in new]
    assert got.token_logprobs == pytest.approx([ref[len(p_ids) - 1 + k, t].item() for k, t in enumerate(new)], abs=1e-4)
    assert all(2 <= len(top) <= 3 for top in got.top_logprobs)
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2,
                                                   stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == got.token_logprobs and "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


def test_n_choices_with_a_seed_several_prompts_and_usage_in_a_stream(server, trained):
    tok = trained[2]
    before = server.get("/stats")
    two = server.client.completions.create(model=MODEL, prompt=PROMPTS[2], n=2, max_tokens=4, temperature=0)
    after = server.get("/stats")
    n_prompt = len(tok.encode_batch([PROMPTS[2]])[0])
    # the two choices, queued together into the two free rows, share one prefill (the engine's _fork)
    assert after["prefilled_tokens"] - before["prefilled_tokens"] == n_prompt
    assert after["shared_prefill_tokens"] - before["shared_prefill_tokens"] == n_prompt
    assert two.choices[0].text == two.choices[1].text and two.usage.completion_tokens == 8
    ask = dict(model=MODEL, max_tokens=8, temperature=1.0, seed=7)
    r = server.client.completions.create(prompt=[PROMPTS[0], PROMPTS[1]], n=3, **ask)
    assert [c.index for c in r.choices] == list(range(6))
    again = server.client.completions.create(prompt=[PROMPTS[0], PROMPTS[1]], n=3, **ask)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # reproducible with a seed
    assert len({c.text for c in r.choices[:3]}) > 1  # the choices of one prompt differ
    one = server.client.completions.create(prompt=PROMPTS[1], **ask)
    assert one.choices[0].text == r.choices[3].text  # choice 0 of a prompt is the request with that seed alone
    chunks = list(server.client.completions.create(prompt=[PROMPTS[0], PROMPTS[1]], n=3, stream=True,
                                                   stream_options={"include_usage": True}, **ask))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(6)]
    assert texts == [c.text for c in r.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_sampling_controls_top_k_logit_bias_penalties_and_ignore_eos(server, trained):
    _, model, tok = trained
    greedy = server.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=10, temperature=0)
    top1 = server.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=10, temperature=1.5, seed=3,
                                            extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text  # top_k = 1 leaves only the best token
    forced = tok.encode_batch(["x"])[0][0]
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=5, temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].text == "x" * 5
    ids = tok.encode_batch([PROMPTS[5]])[0]
    penalties = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)
    direct = Engine(model, max_slots=1, max_context=64, chunk_size=16)
    want = direct.submit(Request(ids, 30, stop_tokens=[tok.eos_id], **penalties))
    direct.run()
    pen = server.client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=30, temperature=0,
                                           frequency_penalty=1.5, presence_penalty=0.5, extra_body={"repetition_penalty": 1.3})
    assert pen.usage.completion_tokens == len(want.tokens) and want.tokens != _reference_ids(model, tok, PROMPTS[5], 30)
    assert pen.choices[0].text == tok.decode([t for t in want.tokens if t != tok.eos_id])
    eos = {str(tok.eos_id): 100}  # EOS becomes the best token at every step
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, logit_bias=eos)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop" and r.choices[0].text == ""
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, logit_bias=eos,
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    out = want.tokens  # the penalties make its tokens differ: one first appears at step at >= 1
    at = next(k for k in range(1, len(out)) if out[k] not in out[:k])
    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=30, temperature=0,
                                         frequency_penalty=1.5, presence_penalty=0.5,
                                         extra_body={"repetition_penalty": 1.3, "stop_token_ids": [out[at]]})
    assert r.usage.completion_tokens == at + 1 and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == tok.decode(out[:at])  # the stop token's text is not sent


def test_tokenizer_routes_as_lm_eval_and_vllm_clients_use_them(server, trained):
    _, _, tok = trained

    def post(path, body):
        req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return json.loads(r.read())

    out = post("/tokenize", {"prompt": PROMPTS[2], "add_special_tokens": False})
    assert out["tokens"] == tok.encode_batch([PROMPTS[2]])[0] and out["count"] == len(out["tokens"]) and out["max_model_len"] == 64
    assert post("/detokenize", {"tokens": out["tokens"]})["prompt"] == PROMPTS[2]
    info = server.get("/tokenizer_info")
    assert info["eos_token"] == EOS_TOKEN and post("/tokenize", {"prompt": info["eos_token"]})["tokens"] == [tok.eos_id]
    with pytest.raises(urllib.error.HTTPError) as e:
        post("/detokenize", {"tokens": [1, 100000]})
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["param"] == "tokens"


def test_an_api_key_guards_the_v1_routes(trained):
    _, model, tok = trained
    with Server(create_app(Engine(model, max_slots=1, max_context=64, chunk_size=16), tok, MODEL, api_key="sk-mixattn")) as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client.models.list()  # the test client sends "none"
        error = e.value.body if "message" in e.value.body else e.value.body["error"]
        assert e.value.status_code == 401 and "--api-key" in error["message"]
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-mixattn", max_retries=0, timeout=60)
        assert ok.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0).usage.completion_tokens >= 1
        assert s.get("/health")["status"] == "ok"  # the routes outside /v1 stay open, as vLLM's


def test_metrics_count_what_was_served_in_prometheus_format(trained):
    from prometheus_client.parser import text_string_to_metric_families

    _, model, tok = trained
    with Server(create_app(Engine(model, max_slots=2, max_context=64, chunk_size=16), tok, MODEL)) as s:
        answers = [s.client.completions.create(model=MODEL, prompt=p, max_tokens=m, temperature=0)
                   for p, m in zip(PROMPTS[:3], [5, 9, 3])]
        stream = s.client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=4, temperature=0, stream=True)
        list(stream)
        with urllib.request.urlopen(s.url + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            samples = [x for f in text_string_to_metric_families(r.read().decode()) for x in f.samples]
    value = lambda name, **labels: next(x.value for x in samples
                                        if x.name == name and all(x.labels.get(k) == v for k, v in labels.items()))
    prompt_tokens = sum(a.usage.prompt_tokens for a in answers) + len(tok.encode_batch([PROMPTS[4]])[0])
    generated = sum(a.usage.completion_tokens for a in answers) + 4
    assert value("mixattn:prompt_tokens_total") == prompt_tokens and value("mixattn:generation_tokens_total") == generated
    assert value("mixattn:request_success_total", finished_reason="length") == 4
    assert value("mixattn:time_to_first_token_seconds_count") == 4 == value("mixattn:e2e_request_latency_seconds_count")
    assert value("mixattn:time_per_output_token_seconds_count") == 4
    assert value("mixattn:num_requests_running") == 0 == value("mixattn:num_requests_waiting")
    assert value("mixattn:max_in_flight_tokens") >= max(a.usage.total_tokens for a in answers) - 1


def test_an_engine_that_fails_answers_503_and_health_says_so(trained):
    """A decode step that raises (a GPU fault, say): the request in flight gets
    an error (500-class, naming it; in a stream, an error event), /health turns
    503 for a liveness probe, and later requests are refused at once instead
    of waiting forever."""
    _, model, tok = trained

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for stream in (False, True):
        with Server(create_app(Engine(model, max_slots=1, max_context=64, chunk_size=16, step_fn=broken), tok, MODEL)) as s:
            if stream:  # the client raises on the stream's error event
                with pytest.raises(openai.APIError, match="illegal memory access"):
                    list(s.client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=0, stream=True))
            else:
                with pytest.raises(openai.InternalServerError) as e:
                    s.client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=0)
                assert e.value.status_code == 503 and "illegal memory access" in str(e.value.body)
            with pytest.raises(urllib.error.HTTPError) as e:
                s.get("/health")
            assert e.value.code == 503 and "restart the server" in json.loads(e.value.read())["error"]["message"]
            started = time.time()
            with pytest.raises(openai.InternalServerError, match="serves no more requests"):
                s.client.completions.create(model=MODEL, prompt="y", max_tokens=2, temperature=0)
            assert time.time() - started < 10
