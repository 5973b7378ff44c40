"""serve.py through a real HTTP client (and headless Chromium where installed), and sample.py, on tiny checkpoints
made here: a chat-tuned one that has learnt to answer "hi" with "ok" and END, and an untrained one."""
import http.client
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import data
from conftest import ROOT, run_script
from convert import load_run
from model import GPT, GPTConfig

CHARS = "\n !,.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=len(CHARS))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
BASE_TOKEN_LIMIT = 100000  # a stream this long lasts well over busy_wait (2 s) on any CPU
tokenizer = data.Tokenizer({"tokenizer": "char", "chars": CHARS})


def save_run(path, model, mode):
    path.mkdir()
    torch.save({"model": model.state_dict(), "model_args": TINY, "config": {"dataset": "tiny", "mode": mode},
                "tokenizer": tokenizer.spec}, path / "ckpt.pt")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """data/tiny/meta.json; chat/: a model trained on one chat turn (mode 'sft'); base/: an untrained one."""
    work = tmp_path_factory.mktemp("serve")
    (work / "data" / "tiny").mkdir(parents=True)
    (work / "data" / "tiny" / "meta.json").write_text(json.dumps({"tokenizer": "char", "chars": CHARS,
                                                                  "vocab_size": len(CHARS)}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    turns = torch.tensor(tokenizer.encode("Human: hi\n\nAssistant: ok\nEND\n\n") * 2)
    x, y = turns[None, :32], turns[None, 1:33]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    save_run(work / "chat", model, "sft")
    save_run(work / "base", GPT(GPTConfig(**TINY)), "pretrain")
    return work


def greedy(work, run, ids, n):
    """The reference: the checkpoint's greedy continuation of ids, decoded, straight from model.generate."""
    model = load_run(work / run)[0]
    return tokenizer.decode(model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids):].tolist())


def start_server(work, run, *args):
    log = open(work / f"{run}.log", "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={run}", "--port=0",
                             "--device=cpu", *args], cwd=work, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=log,
                            text=True)
    line = proc.stdout.readline()
    assert "serving" in line, (work / f"{run}.log").read_text()
    return proc, int(line.rsplit(":", 1)[1]), work / f"{run}.log"


@pytest.fixture(scope="module")
def chat_server(work):
    proc, port, log = start_server(work, "chat", "--token_limit=64", "--prompt_limit=100")
    yield port
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def base_server(work):
    proc, port, log = start_server(work, "base", f"--token_limit={BASE_TOKEN_LIMIT}", "--busy_wait=2")
    yield port, log
    proc.terminate()
    proc.wait(10)


def request(port, method="POST", path="/api/generate", body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=raw if raw is not None else json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    return resp.status, json.loads(data) if resp.headers["Content-Type"].startswith("application/json") else data


def stream(port, body):
    """The events of a streamed request, each read off the connection as it comes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/api/generate", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Transfer-Encoding"] == "chunked"
    events = [json.loads(line[len("data: "):]) for line in iter(resp.readline, b"") if line.startswith(b"data: ")]
    conn.close()
    return events


# -----------------------------------------------------------------------------
# the chat template, streamed

@pytest.mark.parametrize("text", [" ok\nEND\n\nHuman: hi", "  two words \n", "a line\nEN", "x\n\nHuman: y",
                                  "caf\ufffd", " almost\nEN\nEND", "Assist", "\n\nAssistant: again"])
def test_partial_reply_only_shows_what_clean_reply_keeps(text):
    final = data.clean_reply(text)
    shown = [data.partial_reply(text[:i]) for i in range(len(text) + 1)]
    assert all(final.startswith(s) for s in shown)
    assert all(a == b[:len(a)] for a, b in zip(shown, shown[1:]))  # it only grows
    assert data.partial_reply(text) == final or not any(m in text for m in data.MARKERS)


def test_partial_reply_holds_back_a_marker_start():
    assert data.partial_reply(" ok\nEN") == "ok"
    assert data.partial_reply(" ok then\nHum") == "ok then"
    assert data.partial_reply(" ok\nEND more") == "ok"


# -----------------------------------------------------------------------------
# sample.py and serve.py stop at END

def test_generate_stop_ends_early_on_the_same_tokens(work):
    model, x = load_run(work / "base")[0], torch.tensor([tokenizer.encode("hi")])
    full = model.generate(x, 12, temperature=0)
    seen = []
    stopped = model.generate(x, 12, temperature=0, stop=lambda idx: seen.append(idx.size(1)) or idx.size(1) == 7)
    assert torch.equal(stopped, full[:, :7]) and seen == [3, 4, 5, 6, 7]  # called after each token, until true


def test_sample_stops_at_end_for_a_chat_tuned_model(work):
    reference = greedy(work, "chat", data.encode_chat(tokenizer, "hi")[0], 40)
    n = next(k for k in range(1, 41) if data.END in reference[:k])  # a character per token
    assert reference[:n] == " ok\nEND"  # the fixture's model has learnt its turn
    (work / "prompt.txt").write_text("Human: hi\n\nAssistant:")
    proc = run_script("sample.py", ["--out_dir=chat", "--device=cpu", "--start=FILE:prompt.txt", "--temperature=0",
                                    "--num_samples=1", "--max_new_tokens=40"], work, check=False, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Human: hi\n\nAssistant: ok\nEND\n---")
    assert f"{n} tokens in" in proc.stdout


def test_chat_reply_is_the_greedy_generation_up_to_end(work, chat_server):
    reference = data.clean_reply(greedy(work, "chat", data.encode_chat(tokenizer, "hi")[0], 40))
    status, answer = request(chat_server, body={"prompt": "hi", "temperature": 0, "max_new_tokens": 40})
    assert status == 200
    assert answer["text"] == reference == "ok"
    assert answer["stopped"] == "end" and answer["tokens"] == len(" ok\nEND")
    events = stream(chat_server, {"prompt": "hi", "temperature": 0, "max_new_tokens": 40})
    assert "".join(e["text"] for e in events[:-1]) == "ok" and events[-1]["done"]
    assert {**events[-1], "seconds": 0} == {**answer, "done": True, "seconds": 0}


def test_continuation_streams_token_by_token_and_matches_the_json_answer(work, base_server):
    port, _ = base_server
    body = {"prompt": "ROMEO:", "mode": "continue", "temperature": 0, "max_new_tokens": 20}
    reference = greedy(work, "base", tokenizer.encode("ROMEO:"), 20)
    status, answer = request(port, body=body)
    assert status == 200 and answer["text"] == reference
    assert answer["stopped"] == "length" and answer["tokens"] == 20
    events = stream(port, body)
    pieces = [e["text"] for e in events[:-1]]
    assert len(pieces) >= 10  # characters come one token at a time (a held-back U+FFFD aside, none here)
    assert "".join(pieces) == reference == events[-1]["text"]


def test_history_is_part_of_the_chat_context(work, chat_server):
    history = [["hi", "ok"]]
    ids = data.encode_chat(tokenizer, "hi", history=[("hi", "ok")])[0]
    reference = data.clean_reply(greedy(work, "chat", ids, 30))
    status, answer = request(chat_server, body={"prompt": "hi", "history": history, "temperature": 0,
                                                "max_new_tokens": 30})
    assert status == 200 and answer["text"] == reference


# -----------------------------------------------------------------------------
# the page and bad requests

def test_page_is_served(chat_server):
    status, page = request(chat_server, "GET", "/")
    assert status == 200 and "<textarea" in page and "/api/generate" in page
    assert '"chat": true' in page and '"token_limit": 64' in page
    assert request(chat_server, "GET", "/nowhere")[0] == 404
    assert request(chat_server, "POST", "/", body={})[0] == 405
    status, answer = request(chat_server, "GET", "/api/generate")  # N6: the API, asked with the wrong method
    assert status == 405 and "use POST" in answer["error"], answer


@pytest.mark.parametrize("raw, message", [
    ("not json", "the body is not JSON"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ('{"text": "hi"}', "unknown field 'text'"),
    ("{}", "the field 'prompt' is required"),
    ('{"prompt": 3}', "'prompt' must be a string, got a number"),
    ('{"prompt": "hi", "max_new_tokens": "5"}', "'max_new_tokens' must be an integer, got a string"),
    ('{"prompt": "hi", "max_new_tokens": true}', "'max_new_tokens' must be an integer, got a boolean"),
    ('{"prompt": "hi", "mode": "poem"}', "'mode' must be 'chat' or 'continue'"),
    ('{"prompt": "hi", "history": [["a"]]}', "'history' must be a list of [prompt, reply] pairs"),
    ('{"prompt": "hi", "temperature": -1}', "'temperature' must be 0 (greedy) or more"),
    ('{"prompt": "hi", "temperature": NaN}', "'temperature' must be 0 (greedy) or more"),
    ('{"prompt": "hi", "top_p": 0}', "'top_p' must be above 0"),
    ('{"prompt": "Human: hi"}', "the prompt contains the chat marker 'Human:'"),
    ('{"prompt": "hi \\u20ac", "mode": "continue"}', "the prompt has characters outside the"),
    ('{"prompt": "hi", "max_new_tokens": 65}', "'max_new_tokens' must be from 1 to 64 (the server's token_limit)"),
    ('{"prompt": "hi", "max_new_tokens": 0}', "'max_new_tokens' must be from 1 to 64"),
    (json.dumps({"prompt": "h" * 60, "history": [["h" * 30, "o" * 11]]}),
     "the prompt and history hold 101 characters, more than the server's prompt_limit of 100"),
])
def test_malformed_or_over_the_limits_gets_400_with_the_reason(chat_server, raw, message):
    status, answer = request(chat_server, raw=raw)
    assert status == 400 and message in answer["error"]


def test_a_body_too_long_for_the_prompt_limit_gets_its_413(chat_server):
    """B8: even a 20 MB body gets its answer (read and dropped), not a broken pipe."""
    for size in (10_000, 20_000_000):
        status, answer = request(chat_server, raw=json.dumps({"prompt": "h" * size}))
        assert status == 413 and "prompt_limit of 100" in answer["error"], size
    assert request(chat_server, "GET", "/")[0] == 200  # still serving


def raw_post(port, headers, body=b'{"prompt": "hi"}'):
    """A POST with exactly these headers (http.client would add its own Host and Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
                     + b"\r\n" + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_only_json_from_this_host_with_a_plain_length_is_read(chat_server):
    """B8: a text/plain POST (what any web page may send without a CORS preflight) is a 415, a Host naming another
    server (DNS rebinding) a 403, a Content-Length of other digits than 0-9 a 411; each with its JSON answer."""
    ok = [("Host", f"127.0.0.1:{chat_server}"), ("Content-Type", "application/json"), ("Content-Length", "16"),
          ("Connection", "close")]
    assert raw_post(chat_server, ok)[0] == 200
    for change, status in [(("Content-Type", "text/plain"), 415), (("Host", "evil.example:80"), 403),
                           (("Content-Length", "1\u00b2"), 411)]:
        headers = [change if k == change[0] else (k, v) for k, v in ok]
        got, answer = raw_post(chat_server, headers)
        assert got == status and answer["error"], (change, got, answer)


def test_a_generation_that_fails_gets_a_json_500(chat_server):
    """B8: a request the checks pass whose generation raises (a temperature so small that the scores overflow)."""
    status, answer = request(chat_server, body={"prompt": "hi", "temperature": 1e-300, "max_new_tokens": 3})
    assert status == 500 and answer["error"].startswith("generation failed"), (status, answer)
    events = stream(chat_server, {"prompt": "hi", "temperature": 1e-300, "max_new_tokens": 3})
    assert events[-1]["done"] and events[-1]["error"].startswith("generation failed"), events
    assert request(chat_server, body={"prompt": "hi", "max_new_tokens": 3})[0] == 200  # the model is free again


# -----------------------------------------------------------------------------
# one generation at a time, and a client that leaves

def test_busy_waits_then_503_and_a_client_leaving_mid_stream_frees_the_model(base_server):
    port, log = base_server
    short = {"prompt": "hi", "mode": "continue", "max_new_tokens": 5}
    body = json.dumps({"prompt": "hi", "mode": "continue", "max_new_tokens": BASE_TOKEN_LIMIT, "stream": True})
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    t0 = time.monotonic()
    status, answer = request(port, body=short)
    assert status == 503 and "busy" in answer["error"] and time.monotonic() - t0 >= 2  # waited busy_wait, then 503
    waiting = []
    thread = threading.Thread(target=lambda: waiting.append(request(port, body=short)))
    thread.start()
    time.sleep(0.5)  # the second request is now waiting for the model
    sock.close()  # mid-stream
    thread.join(60)
    assert waiting[0][0] == 200 and waiting[0][1]["tokens"] == 5  # it got the model once the stream stopped
    deadline = time.monotonic() + 30  # the stream's handler logs after it lets the model go
    while "client went away" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(l for l in log.read_text().splitlines() if "client went away" in l)
    assert int(line.split("after ")[1].split()[0]) < BASE_TOKEN_LIMIT  # stopped, not run to the end


def test_serve_without_a_checkpoint_says_so(tmp_path):
    proc = run_script("serve.py", [f"--out_dir={tmp_path}", "--port=0"], tmp_path, check=False, env=ONE_THREAD,
                      timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/ckpt.pt not found")


# -----------------------------------------------------------------------------
# a real browser

def browse(url, expression, user_dir, timeout=60, screenshot=None):
    """Opens url in headless Chromium and evaluates the JavaScript expression until it is truthy (or timeout
    seconds pass); returns its value, and writes a PNG of the page to `screenshot`. Chromium is driven over its
    DevTools pipe (JSON messages ending in NUL on file descriptors 3 and 4): unlike --dump-dom's virtual time budget,
    which does not wait for a streamed response, this waits in real time for the page's script."""
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    proc = subprocess.Popen(["bash", "-c", f'exec chromium --headless --no-sandbox --disable-gpu --window-size=900,600 '
                             f'--user-data-dir="$0" --remote-debugging-pipe 3<&{cmd_r} 4>&{res_w}', str(user_dir)],
                            pass_fds=(cmd_r, res_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(cmd_r)
    os.close(res_w)
    buffer, calls = b"", 0

    def call(method, session=None, **params):
        nonlocal buffer, calls
        calls += 1
        os.write(cmd_w, json.dumps({"id": calls, "method": method, "params": params,
                                    **({"sessionId": session} if session else {})}).encode() + b"\0")
        while True:  # skip events until the answer to this call
            while b"\0" not in buffer:
                chunk = os.read(res_r, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                buffer += chunk
            message, buffer = buffer.split(b"\0", 1)
            reply = json.loads(message)
            if reply.get("id") == calls:
                assert "error" not in reply, reply
                return reply["result"]

    try:
        session = call("Target.attachToTarget", targetId=call("Target.createTarget", url=url)["targetId"],
                       flatten=True)["sessionId"]
        deadline, value = time.monotonic() + timeout, None
        while not value and time.monotonic() < deadline:
            value = call("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")
            time.sleep(0.1)
        if screenshot:
            with open(screenshot, "wb") as f:
                f.write(base64.b64decode(call("Page.captureScreenshot", session, format="png")["data"]))
        call("Browser.close")
        return value
    finally:
        os.close(cmd_w)
        os.close(res_r)
        proc.wait(30)


DONE_REPLY = '(e => e && [e.firstChild.textContent, e.lastChild.textContent])(document.querySelector(".model[data-done]"))'


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium not installed (apt-get install chromium)")
def test_the_page_answers_in_headless_chromium(work, chat_server, base_server, tmp_path):
    # the page fills its form from ?prompt=... and sends it on load; DONE_REPLY: the finished reply and its footer
    text, footer = browse(f"http://127.0.0.1:{chat_server}/?prompt=hi&temperature=0", DONE_REPLY,
                          tmp_path / "profile", screenshot=tmp_path / "page.png")
    assert text == "ok" and footer.startswith("7 tokens in ") and footer.endswith(" s, ended by the model")
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a stream of many reads: the page shows all of it, as generated
    port, _ = base_server
    text, footer = browse(f"http://127.0.0.1:{port}/?prompt=hi&mode=continue&temperature=0&max_new_tokens=200",
                          DONE_REPLY, tmp_path / "profile")
    assert text == greedy(work, "base", tokenizer.encode("hi"), 200)
    assert footer.startswith("200 tokens in ") and footer.endswith(" s, stopped at the token limit")
