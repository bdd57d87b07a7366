// pyserver's web pages, live: one WebSocket per page (/live) brings the user's
// events; the chat box sends over it. Everything a message brings is set as
// text (textContent), never as markup. After a reconnect the page re-reads
// what it shows and merges by message id, so nothing is lost or shown twice;
// a chat message not yet confirmed is sent again with the same key, which the
// app server turns into a no-op if the first try had landed.
"use strict";

(function () {
  const body = document.body;
  const csrf = body.dataset.csrf;
  if (!body.dataset.user) return; // the sign-in page
  const me = Number(body.dataset.user);
  const view = body.dataset.view;
  const threadId = body.dataset.thread || null;
  const folder = body.dataset.folder || null;
  const state = document.getElementById("live-state");

  let socket = null;
  let delay = 250;
  const pending = new Map(); // key -> the send request, until the server confirms it

  function setState(text) {
    if (state) {
      state.textContent = text;
      state.dataset.state = text;
    }
  }

  function when(tsUs) {
    return new Date(tsUs / 1000).toISOString().slice(0, 16).replace("T", " ");
  }

  function senderOf(message) {
    if (message.sender) return message.sender === me ? "you" : "user " + message.sender;
    const address = message.from || "unknown sender";
    return message.from_name ? message.from_name + " <" + address + ">" : address;
  }

  function size(bytes) {
    if (bytes < 1024) return bytes + " bytes";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KiB";
    return (bytes / 1024 / 1024).toFixed(1) + " MiB";
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- the thread view ----

  function messageItem(message) {
    const item = el("li", "message" + (message.sender === me ? " mine" : ""));
    item.setAttribute("data-testid", "message");
    item.dataset.message = message.message_id;
    const meta = el("div", "meta");
    meta.append(el("span", "sender", senderOf(message)), " ",
      el("span", "channel", message.channel), " ", el("time", "", when(message.ts)));
    item.append(meta);
    if (message.subject) item.append(el("div", "msubject", message.subject));
    item.append(el("div", "text", message.text));
    if (message.attachments && message.attachments.length) {
      const list = el("ul", "attachments");
      for (const file of message.attachments) {
        const link = el("a", "", file.name);
        link.setAttribute("data-testid", "attachment");
        link.href = "/attachment/" + encodeURIComponent(message.message_id) + "/" + file.ref;
        const line = el("li");
        line.append(link, " ", el("span", "size", size(file.size)));
        list.append(line);
      }
      item.append(list);
    }
    return item;
  }

  function addMessage(message) {
    const list = document.getElementById("messages");
    if (!list || list.querySelector('[data-message="' + CSS.escape(message.message_id) + '"]')) {
      return false;
    }
    // in log order: before the first shown message that is newer
    const item = messageItem(message);
    const after = Array.from(list.children).find((node) => Number(node.dataset.ts) > message.ts);
    item.dataset.ts = message.ts;
    if (after) list.insertBefore(item, after); else list.append(item);
    item.scrollIntoView({ block: "nearest" });
    return true;
  }

  async function getJson(url) {
    const response = await fetch(url, { credentials: "same-origin" });
    if (response.status === 401) { location.href = "/login"; throw new Error("signed out"); }
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }

  async function markRead() {
    if (document.visibilityState !== "visible") return;
    await fetch("/api/thread/" + encodeURIComponent(threadId) + "/read", {
      method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
    });
  }

  async function rereadThread() {
    const thread = await getJson("/api/thread/" + encodeURIComponent(threadId));
    let added = false;
    for (const message of thread.messages) added = addMessage(message) || added;
    if (added || thread.messages.some((m) => m.unread)) await markRead();
  }

  // ---- the folder view ----

  function threadItem(thread) {
    const item = el("li", "thread" + (thread.unread ? " unread" : ""));
    item.setAttribute("data-testid", "thread");
    item.dataset.thread = thread.thread_id;
    const link = el("a");
    link.href = "/thread/" + encodeURIComponent(thread.thread_id);
    const others = thread.participants.filter((p) => p !== me).map((p) => "user " + p);
    link.append(el("span", "who", others.length ? others.join(", ") : "you"), " ",
      el("span", "subject", thread.subject || "(no subject)"), " ",
      el("span", "snippet", thread.snippet), " ",
      el("span", "channels", thread.channels.join(", ")), " ",
      el("time", "", when(thread.last_ts)));
    item.append(link);
    return item;
  }

  async function rereadFolder() {
    const list = document.getElementById("threads");
    if (!list || new URLSearchParams(location.search).has("before")) return;
    const page = await getJson("/api/threads?folder=" + encodeURIComponent(folder));
    list.replaceChildren(...page.threads.map(threadItem));
    if (!page.threads.length) list.append(el("li", "empty", "No conversations here."));
  }

  // ---- counts ----

  function showCounts(folders) {
    for (const [name, count] of Object.entries(folders)) {
      const node = document.querySelector('[data-testid="count-' + name + '"]');
      if (node) node.textContent = String(count.unread);
    }
  }

  async function reread() {
    try {
      if (view === "thread") await rereadThread();
      if (view === "folder") await rereadFolder();
      showCounts((await getJson("/api/counts")).folders);
    } catch (error) {
      console.warn("re-read failed", error);
    }
  }

  // ---- the live socket ----

  function onEvent(event) {
    if (event.event === "message_added" && event.message) {
      if (view === "thread" && event.thread_id === threadId) {
        if (addMessage(event.message) && event.message.unread) markRead();
      }
      if (view === "folder") rereadFolder();
    } else if (view === "folder") {
      rereadFolder();
    }
  }

  function onMessage(frame) {
    const message = JSON.parse(frame.data);
    if (message.type === "event") onEvent(message);
    else if (message.type === "counts") showCounts(message.folders);
    else if (message.type === "resync") reread();
    else if (message.type === "sent") pending.delete(message.key);
    else if (message.type === "error") {
      if (message.key) pending.delete(message.key);
      showError(message.message);
    }
  }

  function showError(text) {
    let node = document.getElementById("live-error");
    if (!node) {
      node = el("p", "error");
      node.id = "live-error";
      node.setAttribute("role", "alert");
      const form = document.getElementById("reply");
      (form || document.querySelector("main")).append(node);
    }
    node.textContent = text;
  }

  function connect() {
    setState(socket ? "reconnecting" : "connecting");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const next = new WebSocket(scheme + location.host + "/live");
    socket = next;
    next.onopen = () => {
      delay = 250;
      setState("live");
      for (const request of pending.values()) next.send(JSON.stringify(request));
    };
    next.onmessage = onMessage;
    next.onclose = () => {
      if (socket !== next) return;
      setState("offline");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 4000);
    };
  }

  function key() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ---- the chat box ----

  const form = document.getElementById("reply");
  if (form && threadId) {
    const box = form.querySelector("textarea");
    const to = JSON.parse(body.dataset.to || "[]");
    const send = () => {
      const text = box.value;
      if (!text.trim()) return;
      const request = { type: "send", key: key(), to: to, text: text, channel: "chat", csrf: csrf };
      pending.set(request.key, request);
      if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(request));
      box.value = "";
    };
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      }
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
  }

  for (const item of document.querySelectorAll("#messages > li")) {
    // the server-rendered messages' positions, for ordering live ones among them
    item.dataset.ts = item.querySelector("time").dataset.ts || "0";
  }
  connect();
})();
