// The web page of `gpt2repro serve`: a chat (chat models) or a completion box (base models), each
// reply streamed from the server's OpenAI API as it is generated. No build step, no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
let model = null;
let history = [];  // the conversation so far: {role, content}
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

function showError(message) { $("error").textContent = message || ""; }

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.statusText; }
}

// POST `body` with stream=true; call onText(text) for every piece; resolve when [DONE] arrives.
async function stream(path, body, onText) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) throw new Error(await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) onText(text);
      }
    }
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  return div;
}

// Fill `target` with the streamed reply; it records how many pieces came and when it is done.
async function streamInto(target, path, body) {
  let pieces = 0;
  target.dataset.state = "streaming";
  showError("");
  busy = true;
  try {
    await stream(path, body, (text) => { target.textContent += text; target.dataset.chunks = ++pieces; });
    target.dataset.state = "done";
  } catch (e) {
    target.dataset.state = "error";
    showError(e.message);
  } finally {
    busy = false;
  }
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || busy) return;
  $("message").value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  await streamInto(reply, "/v1/chat/completions", { model: model.id, messages });
  if (reply.dataset.state === "done") history.push({ role: "assistant", content: reply.textContent });
}

async function sendCompletion(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt || busy) return;
  const out = $("output");
  out.textContent = "";
  const body = { model: model.id, prompt, max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) };
  await streamInto(out, "/v1/completions", body);
}

async function load() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { showError(await errorText(response) + " (enter the API key above)"); return; }
  showError("");
  model = (await response.json()).data[0];
  $("model").textContent = model.id;
  $("chat").hidden = !model.chat;
  $("complete").hidden = !!model.chat;
  document.body.dataset.ready = model.chat ? "chat" : "complete";
}

$("chat-form").addEventListener("submit", sendChat);
$("complete-form").addEventListener("submit", sendCompletion);
$("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) sendChat(e); });
$("reset").addEventListener("click", () => { history = []; $("log").textContent = ""; showError(""); });
$("key").addEventListener("change", load);
load();
