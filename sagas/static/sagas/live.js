// Keeps the saga list and the saga page current without a reload.
//
// The page names its websocket in #saga-live-status[data-socket]; every element marked
// [data-live] is a region that is re-fetched from the server (the same URL, so the same filters
// and the same permissions) when a saga.progress message arrives, and again after each
// (re)connect, because messages sent while the socket was down are lost: the database is the
// record, the socket only says "look again".
(function () {
  "use strict";

  var REFRESH_EVERY_MS = 1000;   // at most one re-fetch a second, however busy the sagas are
  var RETRY_MAX_MS = 10000;
  var FORBIDDEN = 4403;          // sagas.live_socket closes with this for anyone but staff

  var first = document.getElementById("saga-live-status");
  if (!first || !window.WebSocket) return;
  var socketPath = first.dataset.socket;
  var shown = { state: "connecting", text: "connecting…" };

  var refreshTimer = null;
  var lastRefresh = 0;
  var retryMs = 500;

  // The indicator may sit in a region that a refresh replaces: look it up each time.
  function show(state, text) {
    shown = { state: state, text: text };
    var indicator = document.getElementById("saga-live-status");
    indicator.dataset.state = state;
    indicator.textContent = text;
  }

  function openDetails(region) {
    return Array.prototype.map.call(region.querySelectorAll("details"), function (d) { return d.open; });
  }

  function swapRegions(fresh) {
    document.querySelectorAll("[data-live]").forEach(function (region) {
      var replacement = fresh.getElementById(region.id);
      if (!replacement) return;
      var wasOpen = openDetails(region);  // keep what the reader unfolded
      region.replaceWith(replacement);
      replacement.querySelectorAll("details").forEach(function (d, i) { if (wasOpen[i]) d.open = true; });
    });
  }

  function refresh() {
    refreshTimer = null;
    lastRefresh = Date.now();
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        swapRegions(fresh);
        document.title = fresh.title;
        show(shown.state, shown.text);
      })
      .catch(function (error) { show("stale", "live: refresh failed (" + error.message + ")"); });
  }

  function scheduleRefresh() {
    if (refreshTimer) return;
    var wait = Math.max(0, lastRefresh + REFRESH_EVERY_MS - Date.now());
    refreshTimer = setTimeout(refresh, wait);
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + socketPath);
    socket.onopen = function () {
      retryMs = 500;
      show("live", "● live");
      scheduleRefresh();  // catch up on whatever happened while we were not listening
    };
    socket.onmessage = function (event) {
      var message = JSON.parse(event.data);
      if (message.type === "saga.progress") scheduleRefresh();
    };
    socket.onclose = function (event) {
      if (event.code === FORBIDDEN) {
        show("off", "live updates are for staff only");
        return;
      }
      show("down", "○ reconnecting…");
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    };
  }

  connect();
})();
