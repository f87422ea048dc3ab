// The web page of `gpt2repro serve`: a chat (chat models) or a completion box (base models), each
// reply streamed from the server's OpenAI API as it is generated. Conversations and settings live in
// the browser (store.js); replies are rendered by markdown.js. Model and user text only ever reaches
// the page through textContent. No build step, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const CHAT = "/v1/chat/completions";
const COMPLETIONS = "/v1/completions";
const DEFAULTS = { system: "", temperature: "0.8", top_k: "40", top_p: "0.95", max_tokens: "256", seed: "" };
const FIELDS = { system: "system", temperature: "temperature", top_k: "top-k", top_p: "top-p", max_tokens: "max-tokens", seed: "seed" };

let model = null; // the served model: {id, chat, context_length}
let conversation = null; // the one shown
let running = null; // the AbortController of the reply under way
let retry = null; // the turn a context overflow failed ({messages, draft}), for "drop the oldest turns"

const { el } = Markdown; // an element with a class and its text (through textContent)

function button(text, label, onClick) {
  const b = el("button", "", text);
  b.type = "button";
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// ---- settings: the inputs' values, kept in localStorage on every change

function loadSettings(values) {
  for (const [key, id] of Object.entries(FIELDS)) $(id).value = values[key] ?? DEFAULTS[key];
}

function saveSettings() {
  Store.saveSettings(Object.fromEntries(Object.entries(FIELDS).map(([key, id]) => [key, $(id).value])));
}

function number(id, fallback) {
  const value = $(id).value.trim();
  return value === "" || !Number.isFinite(Number(value)) ? fallback : Number(value);
}

// The sampling parameters, named as the API names them (an empty seed: a random one).
function sampling() {
  const params = { temperature: number("temperature", 1), top_k: Math.trunc(number("top-k", 0)), top_p: number("top-p", 1) };
  const seed = number("seed", null);
  if (Number.isInteger(seed)) params.seed = seed;
  return params;
}

const maxTokens = () => Math.max(1, Math.trunc(number("max-tokens", Number(DEFAULTS.max_tokens))));

// ---- the API

class APIError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

async function failure(response) {
  try {
    const { error } = await response.json();
    return new APIError(error.message, error.code);
  } catch (e) {
    return new APIError(response.statusText || `HTTP ${response.status}`);
  }
}

async function post(path, body, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST `body` and call onChunk(chunk) for every server-sent event; resolve when [DONE] arrives.
async function stream(path, body, signal, onChunk) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new APIError("the server closed the stream before it ended");
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(chunk.error.message, chunk.error.code);
      onChunk(chunk);
    }
  }
}

// One reply: count the prompt's tokens, ask for at most Max tokens within the context's room, stream
// the text to onText(text so far, pieces so far). Resolves to {text, stats}; stats.finish is the
// server's finish_reason, or "stopped" when Stop (or Esc) ended it. Throws APIError, whose code is
// "context_length_exceeded" when the prompt leaves no room for a reply.
async function reply(path, body, onText) {
  const controller = new AbortController();
  setBusy(controller);
  let text = "", pieces = 0, usage = null, finish = null, sent = 0, first = 0, last = 0, limit = 0, room = 0;
  try {
    const prompt = path === CHAT ? { messages: body.messages } : { prompt: body.prompt };
    const counted = await post("/tokenize", { model: model.id, ...prompt }, controller.signal);
    room = counted.max_model_len - counted.count;
    if (room < 1) {
      throw new APIError(`the conversation is ${counted.count} tokens, the model's whole context (${counted.max_model_len}): no room for a reply`, "context_length_exceeded");
    }
    limit = Math.min(maxTokens(), room);
    const request = { ...body, ...sampling(), max_tokens: limit, stream: true, stream_options: { include_usage: true } };
    sent = performance.now();
    await stream(path, request, controller.signal, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const piece = choice.delta ? choice.delta.content : choice.text;
        if (piece) {
          last = performance.now();
          first = first || last;
          text += piece;
          onText(text, ++pieces);
        }
        finish = choice.finish_reason || finish;
      }
    });
  } catch (e) {
    if (!controller.signal.aborted) throw e;
    finish = "stopped";
  } finally {
    setBusy(null);
  }
  // time to first token from the chat request (after /tokenize); tokens/s over the tokens after the first.
  // A stream that ends without its usage chunk (a stopped one) counts its pieces: about a token each.
  const tokens = usage ? usage.completion_tokens : pieces;
  const stats = { tokens, finish, max_tokens: limit, context_full: limit === room && finish === "length" };
  if (!usage) stats.approx = true;
  if (first) stats.ttft = (first - sent) / 1000;
  if (tokens > 1 && last > first) stats.tps = (tokens - 1) / ((last - first) / 1000);
  return { text, stats };
}

function setBusy(controller) {
  running = controller;
  for (const id of ["send", "generate"]) $(id).hidden = !!controller;
  for (const id of ["stop", "stop-complete"]) $(id).hidden = !controller;
  document.body.classList.toggle("busy", !!controller);
}

function stop() {
  if (running) running.abort();
}

// The statistics line of a reply: tokens, time to first token, tokens/s, and why it ended early.
function statsLine(stats) {
  const line = el("div", "stats");
  const parts = [];
  if (stats.tokens != null) parts.push(`${stats.approx ? "about " : ""}${stats.tokens} tokens`);
  if (stats.ttft != null) parts.push(`${stats.ttft.toFixed(2)} s to first token`);
  if (stats.tps != null) parts.push(`${stats.tps.toFixed(1)} tokens/s`);
  line.append(parts.join(" · "));
  const why = { stopped: "stopped", length: stats.context_full ? "cut: the context is full" : `cut at Max tokens (${stats.max_tokens})` }[stats.finish];
  if (why) line.append(el("span", "cut", why));
  if (stats.approx) line.title = "counted from the streamed pieces (the server sends its count only with a reply that ends)";
  Object.assign(line.dataset, { tokens: stats.tokens ?? "", ttft: stats.ttft ?? "", tps: stats.tps ?? "", finish: stats.finish ?? "" });
  if (stats.approx) line.dataset.approx = "true";
  return line;
}

// ---- errors

function showError(error, turn = null) {
  const message = error ? error.message || String(error) : "";
  const overflow = error && error.code === "context_length_exceeded";
  retry = overflow && turn && turn.messages.length > 1 ? turn : null;
  $("error").textContent = overflow ? `The conversation no longer fits the model's context: ${message}.` : message;
  $("drop-oldest").hidden = !retry;
  $("notice").hidden = !message;
}

// ---- the chat

function withSystem(messages) {
  const system = $("system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...messages.map(({ role, content }) => ({ role, content }))];
}

// Send `messages` (ending with a user turn) and add the reply. A turn that fails leaves the
// conversation as it was, and gives `draft` back to the message box.
async function respond(messages, draft) {
  const before = conversation.messages;
  const answer = { role: "assistant", content: "" };
  conversation.messages = [...messages, answer];
  showError(null);
  showConversation();
  const node = $("log").lastElementChild;
  node.dataset.state = "streaming";
  const body = node.querySelector(".body");
  const rollBack = (error) => {
    conversation.messages = before;
    if (draft !== null && !$("message").value) $("message").value = draft;
    showError(error, { messages, draft });
  };
  let out = null;
  try {
    out = await reply(CHAT, { model: model.id, messages: withSystem(messages) }, (text, pieces) => {
      body.replaceChildren(Markdown.render(text));
      node.dataset.chunks = pieces;
      scrollDown();
    });
  } catch (e) {
    rollBack(e);
  }
  if (out && out.stats.finish === "stopped" && !out.text) {
    rollBack(null); // stopped before any text: as if never sent
  } else if (out) {
    Object.assign(answer, { content: out.text, stats: out.stats });
    if (conversation.title === "New chat") conversation.title = messages[0].content.split("\n")[0].slice(0, 40);
    if (persist(conversation)) Store.setCurrent(conversation.id); // a reply the browser can't keep stays shown
  }
  showConversation();
  showSidebar();
}

// Store conversation `c`; false, saying why, if the browser refuses it (its storage full).
function persist(c) {
  try {
    Store.save(c);
    return true;
  } catch (e) {
    const why = e && e.name === "QuotaExceededError" ? "the browser's storage for this page is full" : e.message || String(e);
    showError(new Error(`The conversation could not be saved: ${why}. Delete some conversations to make room.`));
    return false;
  }
}

function sendMessage() {
  const text = $("message").value.trim();
  if (!text || running) return;
  $("message").value = "";
  respond([...conversation.messages, { role: "user", content: text }], text);
}

// After a context overflow: drop the oldest turns until the rest leaves room for a reply of Max
// tokens (at most a quarter of the context), keeping at least the new message, and send again.
async function dropOldestAndRetry() {
  if (!retry || running) return;
  let { messages } = retry;
  const { draft } = retry;
  const controller = new AbortController();
  setBusy(controller);
  try {
    for (;;) {
      const counted = await post("/tokenize", { model: model.id, messages: withSystem(messages) }, controller.signal);
      const want = Math.min(maxTokens(), Math.floor(counted.max_model_len / 4));
      if (counted.max_model_len - counted.count >= want || messages.length <= 1) break;
      messages = messages.slice(1);
      while (messages.length > 1 && messages[0].role !== "user") messages = messages.slice(1);
    }
  } catch (e) {
    if (!controller.signal.aborted) showError(e);
    return;
  } finally {
    setBusy(null);
  }
  if ($("message").value === draft) $("message").value = "";
  respond(messages, draft);
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

async function copyText(text, target) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    // no clipboard API (an insecure origin): copy a selected, hidden text area's text
    const area = document.body.appendChild(el("textarea"));
    area.value = text;
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  target.textContent = "Copied";
  setTimeout(() => (target.textContent = "Copy"), 1500);
}

// A message's bubble: its text (a reply's as markdown), statistics, and its buttons.
function bubble(message, index, last) {
  const node = el("div", `msg ${message.role}`);
  node.dataset.index = index;
  node.dataset.state = message.stats && message.stats.finish === "stopped" ? "stopped" : "done";
  const body = node.appendChild(el("div", "body"));
  if (message.role === "assistant") Markdown.render(message.content, body);
  else body.textContent = message.content;
  const meta = node.appendChild(el("div", "meta"));
  if (message.stats) meta.append(statsLine(message.stats));
  const actions = meta.appendChild(el("span", "actions"));
  actions.append(button("Copy", "Copy message", (e) => copyText(message.content, e.target)));
  if (message.role === "user") actions.append(button("Edit", "Edit message", () => edit(node, index)));
  if (message.role === "assistant" && last) {
    actions.append(button("Regenerate", "Regenerate reply", () => !running && respond(conversation.messages.slice(0, index), null)));
  }
  return node;
}

// Edit user message `index` in place; sending it drops the turns after it.
function edit(node, index) {
  if (running) return;
  const body = node.querySelector(".body");
  const area = el("textarea", "edit");
  area.value = conversation.messages[index].content;
  area.setAttribute("aria-label", "Edited message");
  const send = () => {
    const text = area.value.trim();
    if (text && !running) respond([...conversation.messages.slice(0, index), { role: "user", content: text }], text);
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape") showConversation();
  });
  body.replaceChildren(area, el("div", "row"));
  body.lastChild.append(button("Send", "Send edited message", send), button("Cancel", "Cancel edit", showConversation));
  area.focus();
}

function showConversation() {
  const messages = conversation.messages;
  $("log").replaceChildren(...messages.map((m, i) => bubble(m, i, i === messages.length - 1)));
  scrollDown();
}

// ---- the conversations, in the sidebar

function showSidebar() {
  const items = Store.all().map((c) => {
    const item = el("li", c.id === conversation.id ? "current" : "");
    const open = item.appendChild(button(c.title, `Open conversation ${c.title}`, () => openConversation(c.id)));
    open.className = "open";
    if (c.id === conversation.id) open.setAttribute("aria-current", "true");
    item.append(button("✎", `Rename conversation ${c.title}`, () => rename(c)), button("✕", `Delete conversation ${c.title}`, () => deleteConversation(c)));
    return item;
  });
  $("conversations").replaceChildren(...items);
}

function show(c) {
  conversation = c;
  Store.setCurrent(c.id);
  document.body.classList.remove("sidebar-open");
  showError(null);
  showConversation();
  showSidebar();
}

function openConversation(id) {
  if (!running) show(Store.all().find((c) => c.id === id) || Store.fresh());
}

function newChat() {
  if (running) return;
  show(Store.fresh());
  $("message").focus();
}

function rename(c) {
  const title = prompt("Rename the conversation", c.title);
  if (!title || !title.trim()) return;
  c.title = title.trim();
  persist(c);
  if (c.id === conversation.id) conversation.title = c.title;
  showSidebar();
}

function deleteConversation(c) {
  if (running || !confirm(`Delete the conversation "${c.title}"?`)) return;
  Store.remove(c.id);
  if (c.id === conversation.id) newChat();
  showSidebar();
}

function exportConversations() {
  const link = el("a");
  link.href = URL.createObjectURL(new Blob([Store.exportJSON()], { type: "application/json" }));
  link.download = "gpt2repro-conversations.json";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function importConversations(event) {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file || running) return;
  try {
    const added = Store.importJSON(await file.text());
    openConversation(added[0].id);
  } catch (e) {
    showError(new Error(`could not import ${file.name}: ${e.message}`));
  }
}

// ---- the completion box (base models)

async function sendCompletion() {
  const prompt = $("prompt").value;
  if (!prompt || running) return;
  const out = $("output");
  out.textContent = "";
  out.dataset.state = "streaming";
  $("complete-stats").replaceChildren();
  showError(null);
  try {
    const { stats } = await reply(COMPLETIONS, { model: model.id, prompt }, (text, pieces) => {
      out.textContent = text;
      out.dataset.chunks = pieces;
    });
    out.dataset.state = stats.finish === "stopped" ? "stopped" : "done";
    $("complete-stats").replaceChildren(statsLine(stats));
  } catch (e) {
    out.dataset.state = "error";
    showError(e);
  }
}

// ---- start

async function load() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(new Error((await failure(response)).message + " (enter the API key in Settings)"));
    $("settings").open = true;
    return;
  }
  showError(null);
  model = (await response.json()).data[0];
  $("model").textContent = model.id;
  for (const id of ["chat", "sidebar", "menu", "system-box"]) $(id).hidden = !model.chat;
  $("complete").hidden = !!model.chat;
  if (model.chat) {
    conversation = Store.all().find((c) => c.id === Store.current()) || Store.fresh();
    showConversation();
    showSidebar();
  }
  document.body.dataset.ready = model.chat ? "chat" : "complete";
}

function submitOnEnter(send) {
  return (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  };
}

loadSettings(Store.settings());
$("settings").addEventListener("input", (e) => e.target.id !== "key" && saveSettings());
$("defaults").addEventListener("click", () => {
  loadSettings(DEFAULTS);
  saveSettings();
});
$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sendMessage();
});
$("complete-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sendCompletion();
});
$("message").addEventListener("keydown", submitOnEnter(sendMessage));
$("prompt").addEventListener("keydown", (e) => (e.ctrlKey || e.metaKey) && submitOnEnter(sendCompletion)(e));
document.addEventListener("keydown", (e) => e.key === "Escape" && running && (e.preventDefault(), stop()));
for (const id of ["stop", "stop-complete"]) $(id).addEventListener("click", stop);
$("drop-oldest").addEventListener("click", dropOldestAndRetry);
$("new-chat").addEventListener("click", newChat);
$("export").addEventListener("click", exportConversations);
$("import").addEventListener("change", importConversations);
$("menu").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
$("log").addEventListener("click", (e) => {
  const copy = e.target.closest("button.copy-code");
  if (copy) copyText(copy.closest(".code").querySelector("code").textContent, copy);
});
$("key").addEventListener("change", load);
load();
