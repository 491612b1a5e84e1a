// marid: a build's page keeps itself current while the build is queued or running
// (docs/web.md §3.2): every 2 s it reads the page again and swaps in its heading (status and
// actions), facts and jobs, until the build has ended. Without JavaScript, reload the page.
"use strict";
(function () {
  const FINAL = ["passed", "passed_with_failures", "failed", "killed", "timed_out"];
  const status = () => document.querySelector(".heading .status");
  if (!status() || FINAL.includes(status().dataset.status)) return;
  const parts = [".heading", "dl.facts", "#jobs"];
  async function refresh() {
    try {
      const response = await fetch(location.pathname, { headers: { Accept: "text/html" }, credentials: "same-origin" });
      if (!response.ok) return schedule();
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const selector of parts) {
        const now = document.querySelector(selector);
        const next = page.querySelector(selector);
        if (now && next && !now.contains(document.activeElement)) now.replaceWith(document.importNode(next, true));
      }
    } catch (error) {
      // offline for a moment: try again later
    }
    schedule();
  }
  function schedule() {
    if (status() && !FINAL.includes(status().dataset.status)) setTimeout(refresh, 2000);
  }
  schedule();
})();
