// The dashboard's only script: live refresh, and two small conveniences for forms.
"use strict";

// Replace the contents of [data-live] with its fragment every 2 s while the tab is visible.
// When a refresh fails (the dashboard restarting, its database down), say so above it: a
// page that silently stops changing looks like a search that stopped.
function refreshLive(el) {
  const stale = document.createElement("p");
  stale.className = "stale";
  stale.setAttribute("role", "status");
  stale.hidden = true;
  el.before(stale);
  let updated = new Date();
  const tick = async () => {
    if (!document.hidden) {
      let problem = null;
      try {
        const response = await fetch(el.dataset.live + location.search, {credentials: "same-origin"});
        if (response.ok) el.innerHTML = await response.text();
        else problem = `the dashboard answered ${response.status} ${response.statusText}`;
      } catch (e) {
        problem = "the dashboard did not answer";
      }
      if (problem === null) updated = new Date();
      else stale.textContent = `Not live: last updated at ${updated.toLocaleTimeString()}; ${problem}. Retrying every 2 s.`;
      stale.hidden = problem === null;
    }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

// Select line n (1-based) of a textarea and scroll it into view.
function gotoLine(textarea, n) {
  const lines = textarea.value.split("\n");
  const start = lines.slice(0, n - 1).join("\n").length + (n > 1 ? 1 : 0);
  textarea.focus();
  textarea.setSelectionRange(start, start + lines[n - 1].length);
  const lineHeight = textarea.scrollHeight / Math.max(lines.length, 1);
  textarea.scrollTop = Math.max(0, (n - 4) * lineHeight);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(refreshLive);
  document.querySelectorAll("[data-reload]").forEach((el) => {
    setTimeout(() => location.reload(), 1000 * Number(el.dataset.reload));
  });
  document.querySelectorAll("select[data-autosubmit]").forEach((el) => {
    el.addEventListener("change", () => el.form.submit());
  });
  const yaml = document.getElementById("yaml");
  document.querySelectorAll("[data-goto-line]").forEach((a) => {
    a.addEventListener("click", (event) => {
      event.preventDefault();
      gotoLine(yaml, Number(a.dataset.gotoLine));
    });
  });
  document.querySelectorAll("button[data-needs-two]").forEach((button) => {
    const boxes = button.form.querySelectorAll("input[name=pick]");
    const update = () => {
      button.disabled = [...boxes].filter((b) => b.checked).length !== 2;
    };
    boxes.forEach((b) => b.addEventListener("change", update));
    update();
  });
});
