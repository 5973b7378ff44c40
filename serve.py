"""
A web page and a JSON endpoint over a checkpoint: chat with a fine-tuned model (train.py mode='sft' or 'dpo') or
continue text with any, the tokens streamed as they are generated. Standard library only (http.server):

    python serve.py --out_dir=out-shakespeare-char --port=8000      # then open http://127.0.0.1:8000
    curl -N localhost:8000/api/generate -H 'Content-Type: application/json' -d '{"prompt": "ROMEO:", "stream": true}'

POST /api/generate takes a JSON object: "prompt" (required), "mode" ('chat' or 'continue'; by default 'chat' for a
chat-tuned model), "history" (chat: earlier [prompt, reply] pairs), "max_new_tokens", "temperature", "top_k", "top_p"
and "stream". It answers {"text", "tokens", "stopped": 'end' | 'length', "seconds"}; with "stream": true, server-sent
events instead: {"text": piece} as the text grows, then that answer with "done": true. A chat reply ends at the chat
template's END (or where the model starts a new turn), and a chat-tuned model's continuation at END.
One generation runs at a time (one model, one KV cache): a request that finds the model busy waits up to busy_wait
seconds, then gets a 503. A client that goes away mid-stream stops its generation at the next token.
"""

import http.server
import json
import math
import re
import sys
import threading
import time
from urllib.parse import urlsplit

import torch

import configurator
import data
import hardware
from convert import load_run

out_dir = "out"          # the run directory to load ckpt.pt from
host = "127.0.0.1"       # '0.0.0.0' serves every network interface: anyone who reaches the port can use the model
port = 8000              # 0 picks a free port (printed at start)
max_new_tokens = 256     # a request's default
token_limit = 1024       # the most tokens a request may ask for
prompt_limit = 4000      # the most characters a request's prompt and history may hold
temperature = 0.8        # a request's defaults for sampling, as in sample.py
top_k = 200
top_p = 1.0
busy_wait = 60.0         # seconds a request waits while another generation runs, then 503
seed = 1337
device = "auto"
dtype = "auto"           # 'float32' or 'bfloat16'/'float16' autocast; auto: bf16 on capable GPUs, fp32 elsewhere
try:
    globals().update(configurator.apply(configurator.hyperparameters(globals()), sys.argv[1:],
                                        skip_unknown_in_files=True))
except configurator.ConfigError as e:
    sys.exit(f"error: {e}")

max_new_tokens = min(max_new_tokens, token_limit)
torch.manual_seed(seed)
try:
    device = hardware.pick_device(device)
    dtype = hardware.pick_dtype(dtype, device.split(":")[0])[0]
    model, tokenizer, run_config = load_run(out_dir, device)
except (ValueError, FileNotFoundError, ImportError) as e:
    sys.exit(f"error: {e}")
device_type = device.split(":")[0]
autocast = hardware.autocast(device_type, dtype)
chat_tuned = run_config.get("mode", "pretrain") != "pretrain"
lock = threading.Lock()  # held for the whole of a generation


# -----------------------------------------------------------------------------
# a request: checked in full before it may wait for the model

class BadRequest(ValueError):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


FIELDS = {"prompt": (str, "a string"), "mode": (str, "a string"), "history": (list, "a list"),
          "max_new_tokens": (int, "an integer"), "temperature": ((int, float), "a number"),
          "top_k": (int, "an integer"), "top_p": ((int, float), "a number"), "stream": (bool, "a boolean")}


def parse_request(body):
    """The request in a POST body with its defaults filled in and its prompt tokenized ("ids"); BadRequest says why not."""
    try:
        r = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(r, dict):
        raise BadRequest(f"expected a JSON object, got {data.type_name(r)}")
    for key, value in r.items():
        if key not in FIELDS:
            raise BadRequest(f"unknown field '{key}'; the fields are {', '.join(FIELDS)}")
        kind, name = FIELDS[key]
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):  # JSON true is not a number
            raise BadRequest(f"'{key}' must be {name}, got {data.type_name(value)}")
    if "prompt" not in r:
        raise BadRequest("the field 'prompt' is required")
    r = {"mode": "chat" if chat_tuned else "continue", "history": [], "max_new_tokens": max_new_tokens,
         "temperature": temperature, "top_k": top_k, "top_p": top_p, "stream": False, **r}
    if r["mode"] not in ("chat", "continue"):
        raise BadRequest(f"'mode' must be 'chat' or 'continue', got {r['mode']!r}")
    if r["history"] and r["mode"] != "chat":
        raise BadRequest("'history' is for mode 'chat' only")
    if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in r["history"]):
        raise BadRequest("'history' must be a list of [prompt, reply] pairs of strings")
    if not 1 <= r["max_new_tokens"] <= token_limit:
        raise BadRequest(f"'max_new_tokens' must be from 1 to {token_limit} (the server's token_limit), "
                         f"got {r['max_new_tokens']}")
    if not (math.isfinite(r["temperature"]) and r["temperature"] >= 0):
        raise BadRequest(f"'temperature' must be 0 (greedy) or more, got {r['temperature']}")
    if r["top_k"] < 0:
        raise BadRequest(f"'top_k' must be 0 (off) or more, got {r['top_k']}")
    if not 0 < r["top_p"] <= 1:
        raise BadRequest(f"'top_p' must be above 0 and at most 1, got {r['top_p']}")
    chars = len(r["prompt"]) + sum(len(s) for turn in r["history"] for s in turn)
    if chars > prompt_limit:
        raise BadRequest(f"the prompt and history hold {chars} characters, more than the server's prompt_limit "
                         f"of {prompt_limit}")
    try:
        if r["mode"] == "chat":
            r["ids"] = data.encode_chat(tokenizer, r["prompt"], history=[tuple(t) for t in r["history"]])[0]
        else:
            r["ids"] = tokenizer.encode(r["prompt"], special=True) or [tokenizer.spec.get("eot_id") or 0]
    except ValueError as e:
        raise BadRequest(str(e) if r["mode"] == "chat" else f"the prompt has {e}") from None
    return r


# -----------------------------------------------------------------------------
# generation

def complete(r, emit):
    """Generates for a checked request, calling emit(piece) with each new piece of its text; returns the answer.
    An OSError from emit (the client went away) ends the generation at that token, as "stopped": 'disconnected'."""
    ids, chat_mode, state = r["ids"], r["mode"] == "chat", {"stopped": "length", "sent": ""}

    def decoded(idx):
        """The text generated so far and whether it has ended: a chat reply at any marker, the continuation of a
        chat-tuned model at END (kept, as sample.py prints it)."""
        text = tokenizer.decode(idx[0, len(ids):].tolist())
        if chat_mode:
            return text, any(m in text for m in data.MARKERS)
        end = text.find(data.END) if chat_tuned else -1
        return (text, False) if end < 0 else (text[:end + len(data.END)], True)

    def step(idx):  # generate's stop(): send the new text, and end at the reply's end or the client's
        text, ended = decoded(idx)
        shown = data.partial_reply(text) if chat_mode else text.rstrip("\ufffd")  # U+FFFD: a half-decoded character
        try:
            if len(shown) > len(state["sent"]):
                emit(shown[len(state["sent"]):])
                state["sent"] = shown
        except OSError:
            state["stopped"] = "disconnected"
            return True
        if ended:
            state["stopped"] = "end"
        return ended

    t0 = time.perf_counter()
    x = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
        y = model.generate(x, r["max_new_tokens"], temperature=r["temperature"], top_k=r["top_k"] or None,
                           top_p=r["top_p"], stop=step)
    text = decoded(y)[0]
    text = data.clean_reply(text) if chat_mode else text
    if state["stopped"] != "disconnected" and len(text) > len(state["sent"]):
        try:
            emit(text[len(state["sent"]):])  # what was held back (a generation cut at max_new_tokens)
        except OSError:
            state["stopped"] = "disconnected"
    return {"text": text, "tokens": y.size(1) - x.size(1), "stopped": state["stopped"],
            "seconds": round(time.perf_counter() - t0, 3)}


# -----------------------------------------------------------------------------
# HTTP

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer for the stream
    timeout = 60                   # seconds a silent or stalled client may hold its connection (and mid-stream, the model)

    def send(self, status, body, content_type="application/json", headers=()):
        payload = (json.dumps(body) if content_type == "application/json" else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type + ("; charset=utf-8" if "charset" not in content_type else ""))
        self.send_header("Content-Length", str(len(payload)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        if urlsplit(self.path).path == "/api/generate":
            return self.send(405, {"error": "use POST for /api/generate, with a JSON body"},
                             headers=[("Allow", "POST")])
        if urlsplit(self.path).path != "/":
            return self.send(404, {"error": f"nothing at {self.path}: the page is / and the API POST /api/generate"})
        self.send(200, PAGE, "text/html")

    def do_POST(self):
        if self.path != "/api/generate":
            self.close_connection = True  # its body is left unread
            status, what = (405, "/ is the page (GET)") if self.path == "/" else (404, f"nothing at {self.path}")
            return self.send(status, {"error": f"{what}; the API is POST /api/generate"})
        try:
            self.check_origin()
            r = parse_request(self.read_body())
        except BadRequest as e:
            return self.send(e.status, {"error": str(e)})
        if not lock.acquire(timeout=busy_wait):
            return self.send(503, {"error": f"busy: another generation is running (waited {busy_wait:g} s); retry"},
                             headers=[("Retry-After", "5")])
        try:
            answer = self.stream(r) if r["stream"] else complete(r, emit=lambda piece: None)
        except Exception as e:  # a generation that fails still gets its answer: a 500 that says why
            self.log_message("generation failed: %s: %s", type(e).__name__, e)
            return self.send(500, {"error": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            lock.release()
        try:
            if not r["stream"]:
                self.send(200, answer)
        except OSError:
            answer["stopped"] = "disconnected"
        if answer["stopped"] == "disconnected":
            self.log_message("client went away after %d tokens", answer["tokens"])

    def check_origin(self):
        """Requests only from this server's own page or a program: a JSON Content-Type (which a web page elsewhere
        cannot send without a CORS preflight, which this server never grants), and, on a loopback address, a Host
        header naming it (a DNS-rebinding page's names another)."""
        if self.headers.get_content_type() != "application/json":
            self.close_connection = True
            raise BadRequest("the body must be JSON, sent with Content-Type: application/json", 415)
        name = urlsplit("//" + self.headers.get("Host", "")).hostname
        if host in ("127.0.0.1", "localhost", "::1") and name not in ("127.0.0.1", "localhost", "::1"):
            self.close_connection = True
            raise BadRequest(f"Host {self.headers.get('Host')!r} is not this server's; use "
                             f"http://{host}:{self.server.server_address[1]}", 403)

    def read_body(self):
        length = self.headers.get("Content-Length", "")
        if not re.fullmatch(r"[0-9]{1,12}", length):
            self.close_connection = True
            raise BadRequest("a JSON body with a Content-Length is required", 411)
        if int(length) > 6 * prompt_limit + 4096:  # a JSON-escaped character is at most 6 bytes
            left = int(length)
            while 0 < left <= 2**26:  # read (up to 64 MB) and drop it, so that the client reads the answer
                chunk = self.rfile.read(min(left, 2**16))
                left = left - len(chunk) if chunk else 0
            self.close_connection = True
            raise BadRequest(f"the body is {length} bytes, too long for the server's prompt_limit of {prompt_limit} "
                             f"characters", 413)
        return self.rfile.read(int(length))

    def stream(self, r):
        """Server-sent events, one chunk of the chunked response each: {"text": piece} ..., then the answer."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(fields):
            body = f"data: {json.dumps(fields)}\n\n".encode()
            self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
            self.wfile.flush()

        try:
            answer = complete(r, emit=lambda piece: event({"text": piece}))
        except Exception as e:  # the status is sent: the stream ends with the error instead
            self.log_message("generation failed: %s: %s", type(e).__name__, e)
            answer = {"error": f"generation failed: {type(e).__name__}: {e}", "stopped": "error", "tokens": 0}
        try:
            if answer["stopped"] != "disconnected":
                event({**answer, "done": True})
                self.wfile.write(b"0\r\n\r\n")
                return answer
        except OSError:
            answer["stopped"] = "disconnected"
        self.close_connection = True
        return answer


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nanothink</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 16px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 1.5rem auto; padding: 0 1rem; color: #222 }
header { display: flex; justify-content: space-between; align-items: baseline; gap: 1rem }
.about, .meta { color: #777; font-size: .8rem }
.turn { white-space: pre-wrap; padding: .5rem .8rem; border-radius: .6rem; margin: .5rem 0 }
.human { background: #e3edfd; margin-left: 5rem }
.model { background: #f1f1f1; margin-right: 5rem; min-height: 1.4em }
.error { background: #fde3e3 }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem }
.row { display: flex; gap: .8rem; align-items: center; flex-wrap: wrap; margin: .4rem 0 }
input[type=number] { width: 5rem }
</style></head><body>
<header><h1>nanothink</h1><span class="about" id="about"></span></header>
<div id="log"></div>
<form id="form">
<textarea id="prompt" rows="3" placeholder="Enter sends, Shift+Enter is a new line"></textarea>
<div class="row">
<label>mode <select id="mode"><option value="chat">chat</option><option value="continue">continue text</option></select></label>
<label>tokens <input id="max_new_tokens" type="number" min="1"></label>
<label>temperature <input id="temperature" type="number" min="0" step="0.1"></label>
<button id="send">Send</button><button id="stop" type="button" disabled>Stop</button>
<button id="clear" type="button">Clear</button>
</div></form>
<script>
const INFO = __INFO__;
const $ = id => document.getElementById(id);
const history = [];  // the chat so far, [prompt, reply] pairs, sent with each chat request
let controller = null;
$("about").textContent = `${INFO.run}: ${INFO.chat ? "chat-tuned" : "not chat-tuned"}, up to ${INFO.token_limit} tokens`;
$("mode").value = INFO.chat ? "chat" : "continue";
$("max_new_tokens").value = INFO.max_new_tokens;
$("max_new_tokens").max = INFO.token_limit;
$("temperature").value = INFO.temperature;
$("prompt").maxLength = INFO.prompt_limit;

function turn(cls, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.textContent = text;
  $("log").append(div);
  return div;
}

async function send(event) {
  if (event) event.preventDefault();
  if (controller) return;
  const prompt = $("prompt").value, mode = $("mode").value;
  const body = {prompt, mode, stream: true, max_new_tokens: +$("max_new_tokens").value,
                temperature: +$("temperature").value};
  if (mode === "chat") body.history = history;
  turn("human", prompt);
  const out = turn("model", ""), meta = document.createElement("div");
  meta.className = "meta";
  let reply = "";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/api/generate", {method: "POST", body: JSON.stringify(body),
                                                   headers: {"Content-Type": "application/json"},
                                                   signal: controller.signal});
    if (!response.ok) throw new Error((await response.json()).error);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      for (let cut; (cut = buffer.indexOf("\\n\\n")) >= 0; buffer = buffer.slice(cut + 2)) {
        const data = JSON.parse(buffer.slice("data: ".length, cut));
        reply = data.done ? data.text : reply + data.text;
        out.textContent = reply;
        if (data.done) {
          meta.textContent = `${data.tokens} tokens in ${data.seconds} s, ` +
                             (data.stopped === "end" ? "ended by the model" : "stopped at the token limit");
          out.append(meta);
          out.dataset.done = "true";
          if (mode === "chat") history.push([prompt, reply]);
          $("prompt").value = "";
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { out.classList.add("error"); out.textContent = "error: " + e.message; }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) send(e); });
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });
// a link can ask: /?prompt=Hello&temperature=0 fills the form from its query and sends it
const query = new URLSearchParams(location.search);
for (const key of ["prompt", "mode", "max_new_tokens", "temperature"]) if (query.has(key)) $(key).value = query.get(key);
if (query.has("prompt")) send();
</script></body></html>
"""
PAGE = PAGE.replace("__INFO__", json.dumps({"run": out_dir, "chat": chat_tuned, "token_limit": token_limit,
                                            "max_new_tokens": max_new_tokens,
                                            "temperature": temperature,
                                            "prompt_limit": prompt_limit}).replace("</", "<\\/"))

try:
    server = http.server.ThreadingHTTPServer((host, port), Handler)
except OSError as e:
    sys.exit(f"error: cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host")
server.daemon_threads = True
print(f"serving {out_dir} ({'chat-tuned' if chat_tuned else 'not chat-tuned'}, {device}, {dtype}) on "
      f"http://{host}:{server.server_address[1]}", flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    server.server_close()
