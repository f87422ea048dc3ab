// A small Markdown subset for the replies, built as DOM nodes: every piece of text goes in through
// textContent (never innerHTML), so a reply that spells out HTML shows it as text and runs nothing.
// Blocks: paragraphs (a single newline is a line break), headings, lists (- * + and 1.), quotes,
// rules, fenced code (with a Copy button; an unclosed fence, as while streaming, runs to the end).
// Inline: `code`, **strong**, *em* / _em_, ~~strike~~, and [links](url) to http(s) and mailto only.
"use strict";

const Markdown = (() => {
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const SAFE_URL = /^(https?:\/\/|mailto:)/i;
  // One alternative per inline form; the earliest match wins, the text between stays text.
  const INLINE = new RegExp(
    [
      /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
      /\*\*(?=\S)([\s\S]*?\S)\*\*(?!\*)/.source, // 3: strong (**a *b*** closes after the em)
      /__(?=\S)([\s\S]*?\S)__/.source, // 4: strong
      /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 5: em
      /(?<![\p{L}\p{N}_])_(?=[^\s_])([\s\S]*?[^\s_])_(?![\p{L}\p{N}_])/.source, // 6: em
      /~~(?=\S)([\s\S]*?\S)~~/.source, // 7: strike
      /\[([^\]\n]+)\]\(([^()\s]+)\)/.source, // 8, 9: link
    ].join("|"),
    "gu",
  );

  // Append the inline nodes of `text` to `parent`.
  function inline(parent, text) {
    let at = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > at) parent.append(text.slice(at, m.index));
      at = m.index + m[0].length;
      if (m[2] !== undefined) parent.append(el("code", "", m[2]));
      else if (m[3] !== undefined || m[4] !== undefined) inline(parent.appendChild(el("strong")), m[3] ?? m[4]);
      else if (m[5] !== undefined || m[6] !== undefined) inline(parent.appendChild(el("em")), m[5] ?? m[6]);
      else if (m[7] !== undefined) inline(parent.appendChild(el("del")), m[7]);
      else if (SAFE_URL.test(m[9])) {
        const a = parent.appendChild(el("a", "", m[8]));
        a.href = m[9];
        a.target = "_blank";
        a.rel = "noopener noreferrer";
      } else parent.append(m[0]); // javascript:, data: and the like stay text
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
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^ {0,3}(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;

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

  // The block nodes of `text`, appended to `parent` (a DocumentFragment by default).
  function render(text, parent = document.createDocumentFragment()) {
    const src = text.replace(/\r\n?/g, "\n").split("\n");
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
        inline(parent.appendChild(el("h" + Math.min(m[1].length + 2, 6))), m[2]);
        i++;
      } else if (RULE.test(line)) {
        parent.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < src.length && (m = src[i].match(QUOTE)); i++) body.push(m[1]);
        render(body.join("\n"), parent.appendChild(el("blockquote")));
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

  return { render };
})();
