// medge field app: the service worker. Served at /sw.js (scope /), registered by app.js over HTTPS
// (`serve --https`). It keeps the app shell (the page, its script, style sheet and ondevice.js) on the phone, so a
// reload while the device is off or out of reach still shows the page, which then says the device cannot be
// reached. Nothing else is kept or answered from here: API calls, case files and the phone runtime always go to
// the device. The server writes the shell's hash into VERSION, so a new page or script installs a new copy.
"use strict";

const VERSION = "__SHELL_VERSION__";
const CACHE = `medge-shell-${VERSION}`;
const SHELL = ["/", "/static/app.js", "/static/app.css", "/static/ondevice.js"];
const NETWORK_WAIT_MS = 5000;  // a device that does not answer by then: the kept copy is shown

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith("medge-shell-") && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

// The shell entry a request stands for, or null: everything that is not the shell is left to the network.
function shellKey(request) {
  if (request.method !== "GET") return null;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return null;
  if (url.pathname === "/") return request.mode === "navigate" || request.destination === "document" ? "/" : null;
  return SHELL.includes(url.pathname) ? url.pathname : null;
}

self.addEventListener("fetch", (event) => {
  const key = shellKey(event.request);
  if (key !== null) event.respondWith(networkFirst(event.request, key));
});

// The device's copy when it answers (and kept for next time), else the one kept on the phone.
async function networkFirst(request, key) {
  const cache = await caches.open(CACHE);
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), NETWORK_WAIT_MS);
  try {
    const resp = await fetch(request, { signal: abort.signal });
    if (resp.ok) await cache.put(key, resp.clone());
    return resp;
  } catch (err) {
    const kept = await cache.match(key);
    if (kept) return kept;
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
