// marid: a job's log, live (docs/web.md §3.3). The page holds the log's last part, rendered
// on the server; this follows what the job prints next over Server-Sent Events (the page's
// data-live URL, from data-offset), renders ANSI colours as api/web/ansi.py does, numbers the
// lines, and keeps the view at the end while "Follow the log" is on.
"use strict";
(function () {
  const log = document.getElementById("log");
  if (!log || log.dataset.ended === "true") return;
  const follow = document.getElementById("follow");
  const state = document.querySelector(".log-state");
  let count = Number(log.dataset.lines);  // whole lines shown
  let partial = null;  // the element of an unfinished last line
  let carry = "";  // its text, rendered again whole once its newline comes
  let style = {};  // SGR state across lines

  const ESC = /\x1b(?:\[([0-?]*)[ -\/]*([@-~])|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])/g;
  const CONTROL = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/g;

  function near(n) {  // xterm 256 colours to the 16 ANSI ones, as ansi.py _color_256
    if (n < 16) return n;
    if (n >= 232) return n < 238 ? 0 : n < 250 ? 8 : 7;
    n -= 16;
    const r = Math.floor(n / 36), g = Math.floor(n / 6) % 6, b = n % 6;
    return ((r >= 2 ? 1 : 0) | (g >= 2 ? 2 : 0) | (b >= 2 ? 4 : 0)) + (Math.max(r, g, b) >= 4 ? 8 : 0);
  }

  function apply(s, params) {
    const codes = params ? params.split(";").map((p) => (/^\d+$/.test(p) ? Number(p) : 0)) : [0];
    s = Object.assign({}, s);
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) s = {};
      else if (c === 1) s.b = true;
      else if (c === 2) s.d = true;
      else if (c === 3) s.i = true;
      else if (c === 4) s.u = true;
      else if (c === 22) { delete s.b; delete s.d; }
      else if (c === 23) delete s.i;
      else if (c === 24) delete s.u;
      else if (c >= 30 && c <= 37) s.fg = c - 30;
      else if (c >= 90 && c <= 97) s.fg = c - 82;
      else if (c >= 40 && c <= 47) s.bg = c - 40;
      else if (c >= 100 && c <= 107) s.bg = c - 92;
      else if (c === 39) delete s.fg;
      else if (c === 49) delete s.bg;
      else if ((c === 38 || c === 48) && i + 1 < codes.length) {
        let color = null;
        if (codes[i + 1] === 5 && i + 2 < codes.length) { color = near(codes[i + 2]); i += 2; }
        else if (codes[i + 1] === 2 && i + 4 < codes.length) {
          const [r, g, b] = codes.slice(i + 2, i + 5);
          color = ((r >= 128 ? 1 : 0) | (g >= 128 ? 2 : 0) | (b >= 128 ? 4 : 0)) + (Math.max(r, g, b) >= 200 ? 8 : 0);
          i += 4;
        }
        if (color === null) delete s[c === 38 ? "fg" : "bg"]; else s[c === 38 ? "fg" : "bg"] = color;
      }
    }
    return s;
  }

  function classes(s) {
    const names = [];
    if (s.fg !== undefined) names.push("fg" + s.fg);
    if (s.bg !== undefined) names.push("bg" + s.bg);
    for (const k of ["b", "d", "i", "u"]) if (s[k]) names.push(k);
    return names.join(" ");
  }

  // One line (no newline) into `target`; returns the style at its end.
  function renderLine(text, s, target) {
    const trimmed = text.replace(/\r+$/, "");
    if (trimmed.includes("\r")) text = trimmed.slice(trimmed.lastIndexOf("\r") + 1);
    text = text.replace(/\r/g, "");
    let position = 0;
    const put = (piece) => {
      piece = piece.replace(CONTROL, "");
      if (!piece) return;
      const css = classes(s);
      if (css) {
        const span = document.createElement("span");
        span.className = css;
        span.textContent = piece;
        target.appendChild(span);
      } else {
        target.appendChild(document.createTextNode(piece));
      }
    };
    ESC.lastIndex = 0;
    let m;
    while ((m = ESC.exec(text)) !== null) {
      put(text.slice(position, m.index));
      if (m[2] === "m") s = apply(s, m[1] || "");
      position = ESC.lastIndex;
    }
    put(text.slice(position));
    return s;
  }

  function lineElement(n) {
    const line = document.createElement("span");
    line.className = "line";
    line.id = "L" + n;
    const ln = document.createElement("a");
    ln.className = "ln";
    ln.href = "#L" + n;
    ln.setAttribute("aria-hidden", "true");
    ln.textContent = String(n);
    const lt = document.createElement("span");
    lt.className = "lt";
    line.append(ln, lt);
    return line;
  }

  function add(text) {
    const keep = follow && follow.checked;
    const parts = (carry + text).split("\n");
    carry = parts.pop();
    if (partial) { partial.remove(); partial = null; }
    for (const part of parts) {
      const line = lineElement(++count);
      style = renderLine(part, style, line.querySelector(".lt"));
      log.appendChild(line);
    }
    if (carry) {
      partial = lineElement(count + 1);
      partial.classList.add("partial");
      renderLine(carry, style, partial.querySelector(".lt"));
      log.appendChild(partial);
    }
    if (keep) window.scrollTo(0, document.body.scrollHeight);
  }

  function setStatus(status) {
    const badge = document.querySelector("#job-status .status");
    if (!badge) return;
    badge.dataset.status = status;
    badge.className = "status s-" + status;
    const label = { passed_with_failures: "passed with failures", timed_out: "timed out" }[status] || status;
    const shape = { queued: "○", running: "◔", passed: "✔", passed_with_failures: "✔", failed: "✘", killed: "■", timed_out: "⌛" }[status] || "?";
    badge.innerHTML = "";
    const s = document.createElement("span");
    s.className = "shape";
    s.setAttribute("aria-hidden", "true");
    s.textContent = shape;
    badge.append(s, " " + label);
  }

  const source = new EventSource(log.dataset.live + "?offset=" + encodeURIComponent(log.dataset.offset));
  source.addEventListener("output", (event) => {
    const data = JSON.parse(event.data);
    add(data.text);
    if (log.dataset.status === "queued") { log.dataset.status = "running"; setStatus("running"); }
  });
  source.addEventListener("status", (event) => {
    const data = JSON.parse(event.data);
    if (carry) add("\n");  // the last line had no newline of its own
    log.dataset.status = data.status;
    log.dataset.ended = "true";
    setStatus(data.status);
    if (state) state.textContent = "The job has ended.";
    source.close();
  });
  source.onerror = () => {
    if (log.dataset.ended === "true") return;
    if (state) state.textContent = "Connection lost; reconnecting…";
  };
  source.onopen = () => {
    if (state && log.dataset.ended !== "true") state.textContent = "Running: new lines appear as the job prints them.";
  };
})();
