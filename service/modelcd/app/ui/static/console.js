/* modelcd console: times in the reader's zone, and the live parts (server-sent events). */
"use strict";
(function () {
  var STAGES = ["build", "evaluate", "deploy", "smoke", "promote", "rollback"];
  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) { t.textContent = d.toLocaleString(); }
    });
  }

  function text(tag, cls, value) {
    var el = document.createElement(tag);
    if (cls) { el.className = cls; }
    el.textContent = value;
    return el;
  }

  function timeEl(iso) {
    var t = document.createElement("time");
    t.setAttribute("datetime", iso);
    t.title = iso.replace("T", " ").slice(0, 19) + " UTC";
    t.textContent = t.title;
    var d = new Date(iso);
    if (!isNaN(d)) { t.textContent = d.toLocaleString(); }
    return t;
  }

  function logFor(jobId) {
    var pre = document.querySelector('pre.log[data-job="' + jobId + '"]');
    if (pre) { return pre; }
    var logs = document.getElementById("logs");
    if (!logs) { return null; }
    var section = document.createElement("section");
    section.className = "job-log";
    section.setAttribute("data-job", jobId);
    var h = document.createElement("h3");
    var a = text("a", "", "job " + jobId);
    a.href = "/ui/jobs/" + jobId;
    h.appendChild(a);
    pre = text("pre", "log", "");
    pre.setAttribute("data-job", jobId);
    pre.tabIndex = 0;
    section.appendChild(h);
    section.appendChild(pre);
    logs.appendChild(section);
    return pre;
  }

  function appendLine(pre, line) {
    var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.appendChild(document.createTextNode(line + "\n"));
    if (atEnd) { pre.scrollTop = pre.scrollHeight; }
  }

  function refreshActions() {
    var actions = document.querySelector(".actions");
    if (!actions) { return; }
    fetch(location.href, { credentials: "same-origin" }).then(function (r) { return r.text(); }).then(function (html) {
      var doc = new DOMParser().parseFromString(html, "text/html");
      var fresh = doc.querySelector(".actions");
      if (fresh) { actions.replaceChildren.apply(actions, Array.from(fresh.childNodes)); }
    }).catch(function () {});
  }

  /* A release's phase or a job's state changed: show it, and fetch the buttons it now allows. */
  function showState(id, attr, value) {
    var el = document.getElementById(id);
    if (!el || el.getAttribute(attr) === value) { return; }
    el.setAttribute(attr, value);
    el.className = "state state-" + value;
    el.textContent = value;
    refreshActions();
  }

  function follow(live) {
    var url = live.getAttribute("data-stream") + "?after=" + encodeURIComponent(live.getAttribute("data-after"));
    var es = new EventSource(url);
    var on = function (name, fn) {
      es.addEventListener(name, function (e) { fn(JSON.parse(e.data)); });
    };
    on("phase", function (d) {
      showState("release-phase", "data-phase", d.phase);
      var err = document.getElementById("release-error");
      if (err) { err.textContent = d.error || ""; err.hidden = !d.error; }
    });
    on("stage", function (d) {
      var list = document.getElementById("stages");
      if (!list) { return; }
      var li = list.querySelector('li[data-stage="' + d.stage + '"]');
      if (!li) {
        li = document.createElement("li");
        li.setAttribute("data-stage", d.stage);
        li.appendChild(text("span", "stage-name", d.stage));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(text("span", "stage-state", ""));
        li.appendChild(document.createTextNode(" "));
        li.appendChild(text("span", "stage-duration", ""));
        var later = Array.from(list.children).find(function (other) {
          return STAGES.indexOf(other.getAttribute("data-stage")) > STAGES.indexOf(d.stage);
        });
        list.insertBefore(li, later || null);
      }
      li.setAttribute("data-state", d.state);
      li.setAttribute("data-job", d.job_id);
      li.querySelector(".stage-state").textContent = d.state;
      li.querySelector(".stage-duration").textContent = d.duration;
      if (!li.querySelector("a")) {
        var a = text("a", "", "job " + d.job_id);
        a.href = "/ui/jobs/" + d.job_id;
        li.appendChild(document.createTextNode(" "));
        li.appendChild(a);
      }
    });
    on("event", function (d) {
      var list = document.getElementById("events");
      if (!list || list.querySelector('li[data-id="' + d.id + '"]')) { return; }
      var li = document.createElement("li");
      li.className = "event";
      li.setAttribute("data-kind", d.kind);
      li.setAttribute("data-id", d.id);
      li.appendChild(timeEl(d.ts));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(text("strong", "kind", d.kind));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(text("span", "actor", d.actor));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(text("span", "message", d.message));
      list.appendChild(li);
    });
    on("log", function (d) {
      var pre = document.getElementById("log") || logFor(d.job_id);
      if (pre) { appendLine(pre, d.line); }
    });
    on("state", function (d) { showState("job-state", "data-state", d.state); });
    on("end", function () { es.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    var live = document.getElementById("live");
    if (live && window.EventSource) { follow(live); }
  });
})();
