// What the page keeps in the browser's localStorage (nothing is stored on the server): the sampling
// settings, and the conversations, each {id, title, updated, messages: [{role, content, stats?}]}.
"use strict";

const Store = (() => {
  const SETTINGS = "gpt2repro.settings";
  const CONVERSATIONS = "gpt2repro.conversations";
  const CURRENT = "gpt2repro.current";

  function read(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value ?? fallback;
    } catch (e) {
      return fallback;
    }
  }

  const write = (key, value) => localStorage.setItem(key, JSON.stringify(value));

  // A conversation as stored, or null: only user and assistant turns of text are kept.
  function clean(c) {
    if (!c || typeof c !== "object" || !Array.isArray(c.messages)) return null;
    const messages = c.messages
      .filter((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string")
      .map((m) => ({ role: m.role, content: m.content, ...(m.stats && typeof m.stats === "object" ? { stats: m.stats } : {}) }));
    const title = typeof c.title === "string" && c.title.trim() ? c.title.trim().slice(0, 200) : "New chat";
    return { id: typeof c.id === "string" ? c.id : newId(), title, updated: Number(c.updated) || Date.now(), messages };
  }

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  // Every conversation, the latest first.
  function all() {
    const list = read(CONVERSATIONS, []);
    return (Array.isArray(list) ? list.map(clean).filter(Boolean) : []).sort((a, b) => b.updated - a.updated);
  }

  function save(conversation) {
    conversation.updated = Date.now();
    write(CONVERSATIONS, [conversation, ...all().filter((c) => c.id !== conversation.id)]);
  }

  function remove(id) {
    write(CONVERSATIONS, all().filter((c) => c.id !== id));
  }

  // Conversations from an exported file (its {conversations: [...]}, a list, or one conversation);
  // each gets a new id where one of that id is already kept. Returns how many were added.
  function importJSON(text) {
    const data = JSON.parse(text);
    const list = Array.isArray(data) ? data : Array.isArray(data?.conversations) ? data.conversations : [data];
    const added = list.map(clean).filter(Boolean);
    if (!added.length) throw new Error("the file holds no conversation");
    const kept = all();
    for (const c of added) if (kept.some((k) => k.id === c.id)) c.id = newId();
    write(CONVERSATIONS, [...added, ...kept]);
    return added;
  }

  const exportJSON = () => JSON.stringify({ version: 1, conversations: all() }, null, 2);

  return {
    settings: () => read(SETTINGS, {}),
    saveSettings: (s) => write(SETTINGS, s),
    current: () => localStorage.getItem(CURRENT),
    setCurrent: (id) => localStorage.setItem(CURRENT, id),
    fresh: () => ({ id: newId(), title: "New chat", updated: Date.now(), messages: [] }),
    all,
    save,
    remove,
    importJSON,
    exportJSON,
  };
})();
