// A small Markdown renderer for what a model writes: headings, paragraphs, lists, quotes,
// tables, rules, fenced code, and inline code, emphasis, strike-through and links.
//
// It never turns text into markup: it builds DOM nodes and puts every piece of the model's
// text in text nodes (textContent), so whatever the text holds (<script>, <img onerror>, ...)
// shows as the characters it is. Links keep only http(s) and mailto addresses.
"use strict";

(function () {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;
  const ESCAPABLE = "\\`*_{}[]()#+-.!~|>";

  function el(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function render(text) {
    const fragment = document.createDocumentFragment();
    renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment);
    return fragment;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line);
  }

  function renderBlocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        i++;
        continue;
      }
      let match;
      if ((match = FENCE.exec(line))) {
        i = renderFence(lines, i, match, parent);
      } else if ((match = HEADING.exec(line))) {
        const heading = el("h" + match[1].length);
        renderInline(match[2], heading);
        parent.appendChild(heading);
        i++;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
          inner.push(match[1]);
          i++;
        }
        const quote = el("blockquote");
        renderBlocks(inner, quote);
        parent.appendChild(quote);
      } else if (ITEM.test(line)) {
        i = renderList(lines, i, parent);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
        i = renderTable(lines, i, parent);
      } else {
        const paragraph = [];
        while (i < lines.length && lines[i].trim() && !(paragraph.length && startsBlock(lines[i]))) {
          paragraph.push(lines[i].trim());
          i++;
        }
        const p = el("p");
        paragraph.forEach((text, n) => {
          if (n) p.appendChild(el("br"));
          renderInline(text, p);
        });
        parent.appendChild(p);
      }
    }
  }

  function renderFence(lines, start, match, parent) {
    const marker = match[1];
    const closing = new RegExp("^ {0,3}" + marker[0] + "{" + marker.length + ",}\\s*$");
    const body = [];
    let i = start + 1;
    while (i < lines.length && !closing.test(lines[i])) body.push(lines[i++]);
    const block = el("div", "code-block");
    if (match[2]) {
      const language = el("span", "code-language");
      language.textContent = match[2];
      block.appendChild(language);
    }
    const pre = el("pre");
    const code = el("code");
    code.textContent = body.join("\n");
    pre.appendChild(code);
    block.appendChild(pre);
    parent.appendChild(block);
    return i + 1; // past the closing fence (an unclosed one runs to the end, as while streaming)
  }

  function renderList(lines, start, parent) {
    const first = ITEM.exec(lines[start]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const list = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
    let i = start;
    while (i < lines.length) {
      const match = ITEM.exec(lines[i]);
      if (!match || match[1].length !== indent || /\d/.test(match[2]) !== ordered) break;
      const body = [match[3]];
      i++;
      // The item goes on over lines indented past its marker (a nested list among them), and
      // over blank lines followed by such a line.
      while (i < lines.length) {
        const next = lines[i];
        const nested = ITEM.exec(next);
        if (next.trim() && (nested ? nested[1].length > indent : /^\s/.test(next))) {
          body.push(next.replace(new RegExp("^\\s{0," + (indent + 4) + "}"), ""));
          i++;
        } else if (!next.trim() && i + 1 < lines.length && /^\s+\S/.test(lines[i + 1]) &&
            !(ITEM.exec(lines[i + 1]) && ITEM.exec(lines[i + 1])[1].length <= indent)) {
          body.push("");
          i++;
        } else {
          break;
        }
      }
      const item = el("li");
      if (body.length === 1) renderInline(body[0], item);
      else renderBlocks(body, item);
      list.appendChild(item);
      while (i < lines.length && !lines[i].trim() && i + 1 < lines.length &&
          ITEM.test(lines[i + 1]) && ITEM.exec(lines[i + 1])[1].length === indent) i++;
    }
    parent.appendChild(list);
    return i;
  }

  function cells(line) {
    let text = line.trim();
    if (text.startsWith("|")) text = text.slice(1);
    if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
    return text.split(/(?<!\\)\|/).map((cell) => cell.trim());
  }

  function renderTable(lines, start, parent) {
    const table = el("table");
    const head = el("thead");
    const row = el("tr");
    for (const text of cells(lines[start])) {
      const cell = el("th");
      renderInline(text, cell);
      row.appendChild(cell);
    }
    head.appendChild(row);
    table.appendChild(head);
    const body = el("tbody");
    let i = start + 2;
    while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
      const tr = el("tr");
      for (const text of cells(lines[i])) {
        const cell = el("td");
        renderInline(text, cell);
        tr.appendChild(cell);
      }
      body.appendChild(tr);
      i++;
    }
    table.appendChild(body);
    const wrap = el("div", "table-wrap");
    wrap.appendChild(table);
    parent.appendChild(wrap);
    return i;
  }

  // Delimiters of emphasis: the tag each wraps its text in.
  const EMPHASIS = [["**", "strong"], ["__", "strong"], ["~~", "del"], ["*", "em"], ["_", "em"]];

  function renderInline(text, parent) {
    let plain = "";
    const flush = () => {
      if (plain) parent.appendChild(document.createTextNode(plain));
      plain = "";
    };
    let i = 0;
    outer: while (i < text.length) {
      const ch = text[i];
      const rest = text.slice(i);
      if (ch === "\\" && i + 1 < text.length && ESCAPABLE.includes(text[i + 1])) {
        plain += text[i + 1];
        i += 2;
        continue;
      }
      if (ch === "`") {
        const match = /^(`+)([\s\S]*?[^`])\1(?!`)/.exec(rest);
        if (match) {
          flush();
          const code = el("code");
          code.textContent = match[2].replace(/^ (.*) $/, "$1");
          parent.appendChild(code);
          i += match[0].length;
          continue;
        }
      }
      if (ch === "[" || (ch === "!" && text[i + 1] === "[")) {
        const link = /^!?\[([^\]]*)\]\(\s*<?([^\s)>]+)>?(?:\s+"[^"]*")?\s*\)/.exec(rest);
        if (link) {
          flush();
          appendLink(link[1] || link[2], link[2], parent);
          i += link[0].length;
          continue;
        }
      }
      if (ch === "h" || ch === "w") {
        const bare = /^(https?:\/\/|www\.)[^\s<]*[^\s<.,:;"')\]!?*_~]/.exec(rest);
        if (bare && (i === 0 || /[\s(]/.test(text[i - 1]))) {
          flush();
          const url = bare[0].startsWith("www.") ? "http://" + bare[0] : bare[0];
          appendLink(bare[0], url, parent, true);
          i += bare[0].length;
          continue;
        }
      }
      for (const [marker, tag] of EMPHASIS) {
        if (!rest.startsWith(marker)) continue;
        const end = closingDelimiter(text, i, marker);
        if (end < 0) continue;
        flush();
        const node = el(tag);
        renderInline(text.slice(i + marker.length, end), node);
        parent.appendChild(node);
        i = end + marker.length;
        continue outer;
      }
      plain += ch;
      i++;
    }
    flush();
  }

  function closingDelimiter(text, start, marker) {
    const open = start + marker.length;
    if (open >= text.length || /\s/.test(text[open])) return -1;
    // `_` inside a word (snake_case) is not emphasis.
    if (marker[0] === "_" && start > 0 && /\w/.test(text[start - 1])) return -1;
    let at = text.indexOf(marker, open + 1);
    while (at >= 0) {
      const single = marker.length === 1 && text[at + 1] === marker;
      const afterWord = marker[0] === "_" && /\w/.test(text[at + marker.length] || "");
      if (!/\s/.test(text[at - 1]) && !single && !afterWord) return at;
      at = text.indexOf(marker, at + (single ? 2 : 1));
    }
    return -1;
  }

  function appendLink(label, url, parent, plainLabel) {
    if (!SAFE_URL.test(url)) {
      parent.appendChild(document.createTextNode(label));
      return;
    }
    const a = el("a");
    a.href = url;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    if (plainLabel) a.textContent = label;
    else renderInline(label, a);
    parent.appendChild(a);
  }

  window.RingMarkdown = { render };
})();
