// mamori dashboard: live updates. The pages are complete without this file.
// On a `change` event from /events (only sent when something this user may see changed),
// fetch the same page and swap its <main>, unless the user is typing in a form there.
// Also refresh once a minute: time left changes with time alone. A page whose <main> holds
// an element marked data-no-live (the care-plan editor) is never swapped: it would lose edits.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var live = document.getElementById("live");
  if (!main || !window.EventSource || !window.fetch) return;
  var busy = false, pending = false;

  function typing() {
    var a = document.activeElement;
    return a && main.contains(a) && (a.tagName === "INPUT" || a.tagName === "SELECT" || a.tagName === "TEXTAREA") && a.value !== "";
  }

  function refresh() {
    if (main.querySelector("[data-no-live]")) { return; }
    if (busy) { pending = true; return; }
    if (typing()) { pending = true; return; }
    busy = true;
    fetch(location.href, { headers: { "X-Mamori-Live": "1" }, credentials: "same-origin" })
      .then(function (r) {
        if (r.redirected || !r.ok) { throw new Error("status " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("main");
        if (fresh) {
          main.replaceWith(fresh);
          main = fresh;
          document.body.setAttribute("data-version", String(Date.now()));
        }
      })
      .catch(function () { /* the next event or the minute timer tries again */ })
      .then(function () {
        busy = false;
        if (pending) { pending = false; setTimeout(refresh, 200); }
      });
  }

  var es = new EventSource("/events");
  es.addEventListener("open", function () { if (live) live.hidden = false; });
  es.addEventListener("error", function () { if (live) live.hidden = true; });
  es.addEventListener("change", refresh);
  document.addEventListener("focusout", function () { if (pending) { pending = false; refresh(); } });
  setInterval(refresh, 60000);
})();
