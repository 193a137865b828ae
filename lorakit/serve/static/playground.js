// lorakit playground: one prompt (or chat turn) to several models at once, answers streamed side by side.
// Talks to this server's OpenAI-compatible routes; no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: [],            // [{id, adapter}] as /v1/models lists them: the base first
  selected: new Set(),   // model ids shown as columns
  columns: new Map(),    // model id -> {el, transcript, stats, history}
  controllers: [],       // AbortControllers of the requests in flight
};

// ---- models ------------------------------------------------------------------------------------

async function loadModels() {
  const [models, health] = await Promise.all([getJSON("/v1/models"), getJSON("/health").catch(() => null)]);
  state.models = models.data.map((m) => ({ id: m.id, adapter: Boolean(m.parent) }));
  const listed = new Set(state.models.map((m) => m.id));
  for (const id of [...state.selected]) if (!listed.has(id)) state.selected.delete(id);
  if (state.selected.size === 0 && state.models.length) state.selected.add(state.models[0].id);
  const base = state.models.find((m) => !m.adapter);
  $("server").textContent = health
    ? `${health.model} · ${health.adapters} adapter${health.adapters === 1 ? "" : "s"} loaded`
    : (base ? base.id : "");
  renderModels();
  renderColumns();
}

function renderModels() {
  const box = $("models");
  box.replaceChildren();
  for (const m of state.models) {
    const label = el("label", { className: "model" });
    const check = el("input", { type: "checkbox", checked: state.selected.has(m.id) });
    check.dataset.model = m.id;
    check.addEventListener("change", () => {
      check.checked ? state.selected.add(m.id) : state.selected.delete(m.id);
      renderColumns();
    });
    label.append(check, el("span", { textContent: m.id }), el("span", { className: "tag",
      textContent: m.adapter ? "adapter" : "base" }));
    box.append(label);
  }
}

async function loadAdapter(event) {
  event.preventDefault();
  const name = $("load-name").value.trim();
  if (!name) return;
  const status = $("load-status");
  status.className = "muted small";
  status.textContent = `loading ${name}…`;
  const r = await fetch("/v1/load_lora_adapter", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ lora_name: name, lora_path: name }),
  });
  if (r.ok) {
    status.textContent = `${name} loaded`;
    $("load-name").value = "";
    state.selected.add(name);
  } else {
    status.className = "error small";
    status.textContent = await errorText(r);
  }
  await loadModels();
}

// ---- columns -----------------------------------------------------------------------------------

function renderColumns() {
  const order = state.models.map((m) => m.id).filter((id) => state.selected.has(id));
  for (const [id, col] of state.columns) {
    if (!state.selected.has(id)) { col.el.remove(); state.columns.delete(id); }
  }
  const box = $("columns");
  for (const id of order) {
    if (!state.columns.has(id)) state.columns.set(id, makeColumn(id));
    box.append(state.columns.get(id).el);  // re-appending keeps the models' order
  }
  $("empty").classList.toggle("hidden", order.length > 0);
}

function makeColumn(id) {
  const model = state.models.find((m) => m.id === id);
  const root = el("div", { className: "column" });
  root.dataset.model = id;
  const title = el("h3", { textContent: id });
  title.append(el("span", { className: "kind", textContent: model && model.adapter ? "adapter" : "base model" }));
  const transcript = el("div", { className: "transcript" });
  const stats = el("div", { className: "stats" });
  root.append(title, transcript, stats);
  return { el: root, transcript, stats, history: [] };
}

function clearColumns() {
  for (const col of state.columns.values()) {
    col.history = [];
    col.transcript.replaceChildren();
    col.stats.replaceChildren();
    delete col.el.dataset.state;
  }
}

function addMessage(col, kind, text) {
  const msg = el("div", { className: `msg ${kind}`, textContent: text });
  col.transcript.append(msg);
  col.transcript.scrollTop = col.transcript.scrollHeight;
  return msg;
}

// ---- sending -----------------------------------------------------------------------------------

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function sampling() {
  const params = {
    max_tokens: Number($("max-tokens").value) || 16,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value) || 1,
  };
  if ($("seed").value !== "") params.seed = Number($("seed").value);
  return params;
}

async function send(event) {
  if (event) event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controllers.length || state.columns.size === 0) return;
  const chat = mode() === "chat";
  if (chat) $("input").value = "";
  setRunning(true);
  const runs = [...state.columns.entries()].map(([id, col]) => ask(id, col, text, chat, sampling()));
  await Promise.allSettled(runs);
  setRunning(false);
}

async function ask(model, col, text, chat, params) {
  const body = { model, stream: true, stream_options: { include_usage: true }, ...params };
  if (chat) {
    col.history.push({ role: "user", content: text });
    const system = $("system").value.trim();
    body.messages = system ? [{ role: "system", content: system }, ...col.history] : [...col.history];
    addMessage(col, "user", text);
  } else {
    col.transcript.replaceChildren();
    body.prompt = text;
    addMessage(col, "prompt", text);
  }
  const out = addMessage(col, "assistant streaming", "");
  const run = { t0: performance.now(), first: null, end: null, pieces: 0, text: "", usage: null, finish: null,
                error: null };
  col.el.dataset.state = "streaming";
  const controller = new AbortController();
  state.controllers.push(controller);
  const ticker = setInterval(() => showStats(col, run), 100);
  try {
    const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) run.error = await errorText(r);
    else await readStream(r.body, chat, run, out, col);
  } catch (e) {
    run.error = e.name === "AbortError" ? "stopped" : String(e);
  } finally {
    clearInterval(ticker);
    state.controllers = state.controllers.filter((c) => c !== controller);
  }
  run.end = performance.now();
  out.classList.remove("streaming");
  if (run.error) {
    addMessage(col, "error", run.error);
    if (chat) col.history.pop();  // the turn failed: the next one starts from the last good answer
  } else if (chat) {
    col.history.push({ role: "assistant", content: run.text });
  }
  showStats(col, run);
  col.el.dataset.state = run.error ? "error" : "done";
}

async function readStream(stream, chat, run, out, col) {
  for await (const data of serverSentEvents(stream)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) { run.error = chunk.error.message; break; }
    if (chunk.usage) run.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (piece) {
        if (run.first === null) run.first = performance.now();
        run.text += piece;
        run.pieces += 1;
        out.textContent = run.text;
        col.transcript.scrollTop = col.transcript.scrollHeight;
      }
      if (choice.finish_reason) run.finish = choice.finish_reason;
    }
  }
}

// Yields the data of each server-sent event of a fetch() body.
async function* serverSentEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

function showStats(col, run) {
  const now = run.end ?? performance.now();
  const seconds = (now - run.t0) / 1000;
  const tokens = run.usage ? run.usage.completion_tokens : run.pieces;
  const items = [];
  if (run.usage) items.push(["prompt", `${run.usage.prompt_tokens} tok`]);
  items.push([run.usage ? "completion" : "streamed", `${tokens} tok`]);
  if (run.first !== null) items.push(["first token", `${Math.round(run.first - run.t0)} ms`]);
  items.push(["total", `${seconds.toFixed(2)} s`]);
  if (tokens > 1 && run.first !== null && now > run.first) {  // decoding speed, after the first token
    items.push(["decode", `${((tokens - 1) / ((now - run.first) / 1000)).toFixed(1)} tok/s`]);
  }
  if (run.finish) items.push(["finish", run.finish]);
  col.stats.replaceChildren(...items.map(([k, v]) => {
    const item = el("span", { textContent: `${k} ` });
    item.append(el("b", { textContent: v }));
    return item;
  }));
  if (run.usage) {
    col.stats.dataset.promptTokens = run.usage.prompt_tokens;
    col.stats.dataset.completionTokens = run.usage.completion_tokens;
  }
}

function setRunning(running) {
  $("send").disabled = running;
  $("stop").disabled = !running;
}

// ---- helpers -----------------------------------------------------------------------------------

function el(tag, props) {
  return Object.assign(document.createElement(tag), props || {});
}

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(await errorText(r));
  return r.json();
}

async function errorText(response) {
  const text = await response.text();
  try {
    return `${response.status}: ${JSON.parse(text).error.message}`;
  } catch {
    return `${response.status}: ${text}`;
  }
}

// ---- wiring ------------------------------------------------------------------------------------

$("ask").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e); });
$("stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
$("clear").addEventListener("click", clearColumns);
$("refresh").addEventListener("click", loadModels);
$("load-form").addEventListener("submit", loadAdapter);
for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => {
    $("system-box").classList.toggle("hidden", mode() !== "chat");
    $("input").placeholder = mode() === "chat" ? "Type a message… (Ctrl+Enter sends)" : "Type a prompt… (Ctrl+Enter sends)";
    clearColumns();
  });
}
loadModels().catch((e) => { $("server").textContent = `cannot reach the server: ${e}`; });
