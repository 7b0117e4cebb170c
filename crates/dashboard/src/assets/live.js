// Live updates for the dashboard: when the server says (over server-sent events) that
// what the page shows changed, fetch the page's fragment and swap it in. Without this
// script the page is complete and reloads itself every 30 s.
"use strict";
(function () {
  const main = document.getElementById("live");
  if (!main) { return; }
  document.documentElement.classList.add("js");
  let version = main.dataset.version;
  let fetching = false;
  let again = false;

  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const response = await fetch(main.dataset.fragment, { headers: { "Accept": "text/html" } });
      if (response.ok) {
        main.innerHTML = await response.text();
        document.body.dataset.updated = String(Date.now());
      }
    } catch (e) {
      // The next change event tries again.
    } finally {
      fetching = false;
      if (again) { again = false; refresh(); }
    }
  }

  if (window.EventSource) {
    const events = new EventSource("/ui/events");
    events.addEventListener("open", function () { document.body.classList.add("connected"); });
    events.addEventListener("error", function () { document.body.classList.remove("connected"); });
    events.addEventListener("change", function (event) {
      if (event.data !== version) {
        version = event.data;
        main.dataset.version = version;
        refresh();
      }
    });
  }

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button.copy");
    if (!button || !navigator.clipboard) { return; }
    navigator.clipboard.writeText(button.dataset.copy).then(function () {
      button.textContent = "copied";
      setTimeout(function () { button.textContent = "copy"; }, 1500);
    });
  });
})();
