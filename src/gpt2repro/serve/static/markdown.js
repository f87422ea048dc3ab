// A small Markdown subset for the replies, built as DOM nodes: every piece of text goes in through
// textContent (never innerHTML), so a reply that spells out HTML shows it as text and runs nothing.
// Blocks: paragraphs (a single newline is a line break), headings, lists (- * + and 1.), quotes,
// rules, fenced code (with a Copy button; an unclosed fence, as while streaming, runs to the end).
// Inline: `code`, **strong**, *em* / _em_, ~~strike~~, and [links](url) to http(s) and mailto only.
// Every pattern is linear in its input and nesting is capped (quotes and emphasis, 8 deep), since a
// reply is rendered again on every streamed chunk; a render that fails anyway shows the raw text.
"use strict";

const Markdown = (() => {
  // An element, with a class and its text (through textContent); app.js builds its nodes with it too.
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const SAFE_URL = /^(https?:\/\/|mailto:)/i;
  // The inline forms, tried in this order at each position where one may open: the earliest match
  // wins, the text between stays text. Each opens with a short sticky test; `span` then matches the
  // whole form from there. The closers of a kind don't depend on where it opened (a code span's on
  // its length), so once a kind opened and found no closer, no later opener of it can: it is not
  // tried again. That keeps a line of openers without closers linear instead of quadratic.
  const SPANS = [
    { open: /`+/y, span: /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/y, node: (m) => el("code", "", m[2]) },
    { open: /\*\*(?=\S)/y, span: /\*\*([\s\S]*?\S)\*\*(?!\*)/y, tag: "strong" }, // **a *b*** closes after the em
    { open: /__(?=\S)/y, span: /__([\s\S]*?\S)__/y, tag: "strong" },
    { open: /\*(?=[^\s*])/y, span: /\*([\s\S]*?[^\s*])\*/y, tag: "em" },
    { open: /(?<![\p{L}\p{N}_])_(?=[^\s_])/uy, span: /_([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/uy, tag: "em" },
    { open: /~~(?=\S)/y, span: /~~([\s\S]*?\S)~~/y, tag: "del" },
    { open: /\[/y, span: /\[([^\]\n]+)\]\(([^()\s]+)\)/y, node: link },
  ];
  const OPENERS = "`*_~[";
  const MAX_INLINE_DEPTH = 8; // emphasis inside emphasis deeper than this stays text

  function link(m) {
    if (!SAFE_URL.test(m[2])) return m[0]; // javascript:, data: and the like stay text
    const a = el("a", "", m[1]);
    a.href = m[2];
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return a;
  }

  // The match of one inline form at `at`, or null; `failed` keeps the kinds that found no closer.
  function spanAt(text, at, failed) {
    for (const [kind, form] of SPANS.entries()) {
      form.open.lastIndex = at;
      const opened = form.open.exec(text);
      if (!opened) continue;
      // a code span closes only on a run of its own length; a link's label ends at the first ] or
      // line end, so an opener before that one fails as this one did
      const key = kind === 0 ? "`" + opened[0].length : kind;
      if (kind === 6 ? at < (failed.get(key) ?? -1) : failed.has(key)) continue;
      form.span.lastIndex = at;
      const m = form.span.exec(text);
      if (m) return { m, form, end: form.span.lastIndex };
      if (kind === 6) {
        const ends = [text.indexOf("]", at), text.indexOf("\n", at)].filter((i) => i >= 0);
        failed.set(key, ends.length ? Math.min(...ends) : Infinity);
      } else failed.set(key, true);
      if (kind === 0) return { end: at + opened[0].length }; // a run of backticks without its closer is text
    }
    return null;
  }

  // Append the inline nodes of `text` to `parent`.
  function inline(parent, text, depth = 0) {
    if (depth > MAX_INLINE_DEPTH) return void parent.append(text);
    const failed = new Map();
    let at = 0; // the text before `at` is in
    for (let i = 0; i < text.length; ) {
      const found = OPENERS.includes(text[i]) ? spanAt(text, i, failed) : null;
      if (!found) {
        i++;
        continue;
      }
      if (found.m) {
        if (i > at) parent.append(text.slice(at, i));
        at = found.end;
        const { m, form } = found;
        if (form.node) parent.append(form.node(m));
        else inline(parent.appendChild(el(form.tag)), m[1], depth + 1);
      }
      i = found.end;
    }
    if (at < text.length) parent.append(text.slice(at));
  }

  // Lines joined by line breaks, each line's inline forms rendered.
  function lines(parent, list) {
    list.forEach((line, i) => {
      if (i) parent.append(el("br"));
      inline(parent, line);
    });
    return parent;
  }

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  // No pattern here has two unbounded parts that can trade characters (as `\s*#*\s*$` after a lazy
  // `.*?` did: a heading line of 3000 spaces took 7 s); each is linear in the line's length.
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+([^\n]*))?$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?([^\n]*)$/;
  const ITEM = /^ {0,3}(?:([-*+])|(\d{1,9})[.)])\s+([^\n]*)$/;
  const MAX_QUOTE_DEPTH = 8; // quotes inside quotes deeper than this stay text

  // A heading's text: without its closing #s (a run of them after a space, or all of it).
  function headingText(text = "") {
    text = text.trimEnd();
    let end = text.length;
    while (end > 0 && text[end - 1] === "#") end--;
    if (end === 0) return "";
    return end < text.length && (text[end - 1] === " " || text[end - 1] === "\t") ? text.slice(0, end).trimEnd() : text;
  }

  function codeBlock(source, lang) {
    const box = el("div", "code");
    const head = box.appendChild(el("div", "code-head"));
    head.append(el("span", "lang", lang || "code"));
    const copy = head.appendChild(el("button", "copy-code", "Copy"));
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy code");
    const code = el("code", "", source);
    if (lang) code.dataset.lang = lang;
    box.appendChild(el("pre")).append(code);
    return box;
  }

  // The block nodes of `text`, appended to `parent` (a DocumentFragment by default). Never throws:
  // should rendering fail, `parent` gets the raw text instead.
  function render(text, parent = document.createDocumentFragment()) {
    let nodes;
    try {
      nodes = blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), document.createDocumentFragment(), 0);
    } catch (e) {
      nodes = el("div", "raw", String(text));
    }
    parent.append(nodes);
    return parent;
  }

  // The blocks of lines `src`, `depth` quotes deep, appended to `parent`.
  function blocks(src, parent, depth) {
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = line.match(FENCE))) {
        const body = [];
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        for (i++; i < src.length && !close.test(src[i]); i++) body.push(src[i]);
        i++; // the closing fence
        parent.append(codeBlock(body.join("\n"), m[2]));
      } else if ((m = line.match(HEADING))) {
        inline(parent.appendChild(el("h" + Math.min(m[1].length + 2, 6))), headingText(m[2]));
        i++;
      } else if (RULE.test(line)) {
        parent.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < src.length && (m = src[i].match(QUOTE)); i++) body.push(depth < MAX_QUOTE_DEPTH ? m[1] : src[i]);
        if (depth < MAX_QUOTE_DEPTH) blocks(body, parent.appendChild(el("blockquote")), depth + 1);
        else lines(parent.appendChild(el("p")), body); // too deep: the quote marks stay text
      } else if ((m = line.match(ITEM))) {
        const ordered = m[2] !== undefined;
        const list = parent.appendChild(el(ordered ? "ol" : "ul"));
        if (ordered && m[2] !== "1") list.start = Number(m[2]);
        // items of the same kind; an indented line continues the item before it
        while (i < src.length && (m = src[i].match(ITEM)) && (m[2] !== undefined) === ordered) {
          const item = [m[3]];
          for (i++; i < src.length && /^\s{2,}\S/.test(src[i]) && !ITEM.test(src[i]); i++) item.push(src[i].trim());
          lines(list.appendChild(el("li")), item);
        }
      } else {
        const para = [];
        for (; i < src.length && src[i].trim() && !startsBlock(src[i]); i++) para.push(src[i]);
        lines(parent.appendChild(el("p")), para);
      }
    }
    return parent;
  }

  function startsBlock(line) {
    return [FENCE, HEADING, RULE, QUOTE, ITEM].some((re) => re.test(line));
  }

  return { render, el };
})();
