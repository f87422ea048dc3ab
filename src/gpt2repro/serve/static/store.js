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
  // the settings and which conversation is shown are not worth an error when storage is full
  const quietly = (f) => {
    try {
      f();
    } catch (e) {}
  };

  // What is read back (an imported file, or localStorage someone edited) is not trusted: each field
  // is kept only if it has its type and a sane length, and every conversation gets an id of its own.
  const FINISH = ["stop", "length", "stopped"];
  const ID = /^[\w-]{1,64}$/;
  const MAX_TEXT = 1_000_000; // characters of a message kept
  const MAX_MESSAGES = 10_000; // messages of a conversation kept
  const number = (x) => typeof x === "number" && Number.isFinite(x) && x >= 0;
  const record = (x) => !!x && typeof x === "object" && !Array.isArray(x);

  // A reply's statistics as stored (the fields statsLine reads), or null if none is valid.
  function cleanStats(s) {
    if (!record(s)) return null;
    const stats = {};
    for (const key of ["tokens", "ttft", "tps", "max_tokens"]) if (number(s[key])) stats[key] = s[key];
    for (const key of ["context_full", "approx"]) if (typeof s[key] === "boolean") stats[key] = s[key];
    if (FINISH.includes(s.finish)) stats.finish = s.finish;
    return Object.keys(stats).length ? stats : null;
  }

  // A message as stored, or null: only user and assistant turns of text are kept.
  function cleanMessage(m) {
    if (!record(m) || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") return null;
    const message = { role: m.role, content: m.content.slice(0, MAX_TEXT) };
    const stats = m.role === "assistant" && cleanStats(m.stats);
    if (stats) message.stats = stats;
    return message;
  }

  // A conversation as stored, or null; its id is null unless it is a valid one.
  function clean(c) {
    if (!record(c) || !Array.isArray(c.messages)) return null;
    const messages = c.messages.slice(0, MAX_MESSAGES).map(cleanMessage).filter(Boolean);
    const title = typeof c.title === "string" && c.title.trim() ? c.title.trim().slice(0, 200) : "New chat";
    const id = typeof c.id === "string" && ID.test(c.id) ? c.id : null;
    return { id, title, updated: number(c.updated) ? c.updated : 0, messages };
  }

  // Give every conversation of `list` without an id of its own (none, or one seen before) a new one
  // from fresh(index, id); its id goes in `seen`.
  function distinct(list, seen, fresh) {
    list.forEach((c, i) => {
      let id = c.id;
      while (!id || seen.has(id)) id = fresh(i, id);
      seen.add((c.id = id));
    });
    return list;
  }

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  // Every conversation, the latest first. A kept one without an id of its own gets one from its
  // place in the list, the same on every read (until a write stores it).
  function all() {
    const list = read(CONVERSATIONS, []);
    const kept = Array.isArray(list) ? list.map(clean).filter(Boolean) : [];
    return distinct(kept, new Set(), (i, id) => (id ? `${id}-${i}` : `c${i}`)).sort((a, b) => b.updated - a.updated);
  }

  function save(conversation) {
    conversation.updated = Date.now();
    write(CONVERSATIONS, [conversation, ...all().filter((c) => c.id !== conversation.id)]);
  }

  function remove(id) {
    write(CONVERSATIONS, all().filter((c) => c.id !== id));
  }

  // Conversations from an exported file (its {conversations: [...]}, a list, or one conversation);
  // each gets a new id where one of that id is already kept or earlier in the file. Returns those added.
  function importJSON(text) {
    const data = JSON.parse(text);
    const list = Array.isArray(data) ? data : Array.isArray(data?.conversations) ? data.conversations : [data];
    const added = list.map(clean).filter(Boolean);
    if (!added.length) throw new Error("the file holds no conversation");
    const kept = all();
    distinct(added, new Set(kept.map((c) => c.id)), newId); // ids unique within the file too
    write(CONVERSATIONS, [...added, ...kept]);
    return added;
  }

  const exportJSON = () => JSON.stringify({ version: 1, conversations: all() }, null, 2);

  return {
    settings: () => {
      const settings = read(SETTINGS, {});
      return record(settings) ? Object.fromEntries(Object.entries(settings).filter(([, v]) => typeof v === "string")) : {};
    },
    saveSettings: (s) => quietly(() => write(SETTINGS, s)),
    current: () => localStorage.getItem(CURRENT),
    setCurrent: (id) => quietly(() => localStorage.setItem(CURRENT, id)),
    fresh: () => ({ id: newId(), title: "New chat", updated: Date.now(), messages: [] }),
    all,
    save,
    remove,
    importJSON,
    exportJSON,
  };
})();
