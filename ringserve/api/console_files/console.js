// The console: the ring's state polled from /console/state, and a chat through the public
// /v1/chat/completions. Model text reaches the page only through RingMarkdown (text nodes) or
// textContent; nothing here parses a string as HTML.
"use strict";

(function () {
  const KEY_STORE = "ringserve.console.key";
  const CONVERSATIONS_STORE = "ringserve.console.conversations";
  const SETTINGS_STORE = "ringserve.console.settings";
  const POLL_MS = 1500;
  const RENDER_EVERY_MS = 60;
  const DEFAULT_SETTINGS = {
    system: "", temperature: "0.7", top_p: "1", max_tokens: "1024", seed: "", thinking: "",
    extra: "",
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function readJson(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value === null ? fallback : value;
    } catch (error) {
      return fallback;
    }
  }

  function writeJson(key, value) {
    try {
      localStorage.setItem(key, JSON.stringify(value));
    } catch (error) {
      console.warn("could not keep", key, error);
    }
  }

  // ---- numbers as people read them

  function bytes(n) {
    if (typeof n !== "number") return "–";
    if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(1) + " GiB";
    if (n >= 2 ** 20) return (n / 2 ** 20).toFixed(1) + " MiB";
    return (n / 1024).toFixed(0) + " KiB";
  }

  function count(n) {
    if (typeof n !== "number") return "–";
    for (const [size, unit] of [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"]]) {
      if (n >= size) return (n / size).toFixed(n >= 10 * size ? 0 : 1) + unit;
    }
    return String(n);
  }

  function tokens(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") + " tokens" : "–";
  }

  function seconds(s) {
    if (typeof s !== "number") return "–";
    return s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s";
  }

  function rate(r) {
    return typeof r === "number" ? r.toFixed(r >= 100 ? 0 : 1) : "–";
  }

  // ---- the key

  let locked = false;

  function authHeaders() {
    const key = localStorage.getItem(KEY_STORE);
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function lock() {
    const refused = Boolean(localStorage.getItem(KEY_STORE));
    locked = true;
    $("app").hidden = true;
    $("summary").textContent = "";
    $("ring-status").textContent = "key needed";
    $("ring-status").className = "pill pill-bad";
    clearRing();
    $("messages").replaceChildren();
    $("conversation-list").replaceChildren();
    $("key-gate").hidden = false;
    $("key-error").hidden = !refused;
    $("key-error").textContent = refused ? "The server refused this key." : "";
    $("forget-key").hidden = !refused;
    $("key-input").focus();
  }

  function unlock() {
    if (!locked && !$("app").hidden) return;
    locked = false;
    $("key-gate").hidden = true;
    $("app").hidden = false;
    $("forget-key").hidden = !localStorage.getItem(KEY_STORE);
    renderConversations();
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    poll();
  });

  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    poll();
  });

  // ---- the ring

  let pollTimer = null;
  let lastState = null;

  async function poll() {
    clearTimeout(pollTimer);
    pollTimer = null;
    try {
      const response = await fetch("/console/state", { headers: authHeaders(), cache: "no-store" });
      if (response.status === 401) {
        lock();
        return; // asked again when a key is given
      }
      if (!response.ok) throw new Error("the console's state answered HTTP " + response.status);
      const state = await response.json();
      unlock();
      lastState = state;
      renderRing(state);
    } catch (error) {
      setStatus("API not answering", "pill-bad", String(error.message || error));
      $("ring").classList.add("stale");
    }
    pollTimer = setTimeout(poll, POLL_MS);
  }

  function setStatus(text, kind, title) {
    const pill = $("ring-status");
    pill.textContent = text;
    pill.className = "pill " + kind;
    pill.title = title || "";
  }

  function clearRing() {
    lastState = null;
    for (const id of ["model-facts", "figures", "throughput-caption"]) $(id).replaceChildren();
    $("ranks").tBodies[0].replaceChildren();
    $("ring-reason").hidden = true;
    const canvas = $("throughput");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }

  const STATE_PILLS = {
    serving: "pill-good", waiting: "pill-warn", loading: "pill-warn", broken: "pill-bad",
    unreachable: "pill-bad",
  };

  function renderRing(state) {
    $("ring").classList.remove("stale");
    const model = state.model;
    setStatus(state.ready ? "serving" : state.state, STATE_PILLS[state.state] || "pill-warn",
      state.reason || "");
    $("summary").textContent = model
      ? [model.model, count(model.parameters) + " parameters", model.quantization || model.dtype,
        tokens(model.context_limit) + " context"].join(" · ")
      : "";
    renderFacts(model, state);
    renderFigures(state.live, model);
    drawThroughput(state.throughput, state.history_s);
    renderRanks(state.ranks, model);
    const reason = $("ring-reason");
    reason.hidden = !state.reason;
    reason.textContent = state.reason ? "The ring: " + state.reason : "";
  }

  function layoutText(model) {
    if (!model) return "–";
    const ranks = model.ranks + (model.ranks === 1 ? " rank" : " ranks");
    const backend = model.backend && model.backend !== "single" ? ", " + model.backend : "";
    return model.parallel + " over " + ranks + backend;
  }

  function renderFacts(model, state) {
    const facts = [
      ["model", model ? model.model : "–"],
      ["parameters", model ? count(model.parameters) : "–"],
      ["weights", model ? model.quantization || model.dtype : "–"],
      ["context", model ? tokens(model.context_limit) : "–"],
      ["layout", layoutText(model)],
      ["ring", state.state],
    ];
    const list = el("dl");
    for (const [name, value] of facts) {
      const item = el("div", "fact");
      item.append(el("dt", "", name), el("dd", "", value));
      if (name === "model" && model) item.title = model.model_path;
      list.appendChild(item);
    }
    $("model-facts").replaceChildren(list);
  }

  function restartsText(restarts) {
    if (restarts === null || restarts === undefined) return ["–", "this server does not report restarts"];
    if (typeof restarts === "number") return [String(restarts), ""];
    const total = restarts.count ?? restarts.total ?? restarts.restarts;
    const reason = restarts.last_reason || restarts.reason || "";
    return [typeof total === "number" ? String(total) : "–", reason ? "last: " + reason : ""];
  }

  function renderFigures(live, model) {
    const lookups = live.prefix_cache_lookups;
    const hitRate = typeof live.prefix_cache_hit_rate === "number"
      ? (live.prefix_cache_hit_rate * 100).toFixed(0) + " %" : "–";
    const [restarts, restartsNote] = restartsText(live.restarts ?? (model ? model.restarts : null));
    const figures = [
      ["tokens/s", rate(live.tokens_per_s), "generated over the last seconds", "tokens-per-s"],
      ["running", live.running ?? "–", "requests in the batch", "running"],
      ["queued", live.queued ?? "–", "requests waiting for room", "queued"],
      ["TTFT", seconds(live.ttft_last_s),
        live.ttft_count ? "median " + seconds(live.ttft_median_s) + " over " + live.ttft_count : "no answer yet", "ttft"],
      ["prefix cache", hitRate,
        lookups ? live.prefix_cache_hits + " hits of " + lookups + ", " + count(live.prefix_cache_reused_tokens) + " tokens reused" : "no lookup yet", "prefix-cache"],
      ["restarts", restarts, restartsNote, "restarts"],
      ["generated", count(live.generated_tokens), "tokens since the ring started", "generated"],
    ];
    const cards = figures.map(([name, value, note, key]) => {
      const card = el("div", "figure");
      card.dataset.figure = key;
      card.append(el("span", "figure-value", value), el("span", "figure-name", name),
        el("span", "figure-note", note));
      return card;
    });
    $("figures").replaceChildren(...cards);
  }

  function drawThroughput(points, historyS) {
    const canvas = $("throughput");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 640;
    const height = canvas.clientHeight || 110;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    const peak = Math.max(0, ...points.map((p) => p[1]));
    const top = Math.max(1, peak) * 1.15;
    const x = (age) => width * (1 - age / historyS);
    const y = (value) => height - 4 - (height - 18) * (value / top);
    g.strokeStyle = style.getPropertyValue("--grid").trim() || "#ddd";
    g.lineWidth = 1;
    g.beginPath();
    g.moveTo(0, y(0) + 0.5);
    g.lineTo(width, y(0) + 0.5);
    g.stroke();
    if (points.length) {
      g.beginPath();
      g.moveTo(x(points[0][0]), y(0));
      for (const [age, value] of points) g.lineTo(x(age), y(value));
      g.lineTo(x(points[points.length - 1][0]), y(0));
      g.closePath();
      g.fillStyle = style.getPropertyValue("--chart-fill").trim() || "rgba(40,110,220,.15)";
      g.fill();
      g.beginPath();
      points.forEach(([age, value], n) => (n ? g.lineTo : g.moveTo).call(g, x(age), y(value)));
      g.strokeStyle = style.getPropertyValue("--chart-line").trim() || "#286edc";
      g.lineWidth = 1.5;
      g.stroke();
    }
    g.fillStyle = style.color;
    g.font = "11px system-ui, sans-serif";
    g.fillText("peak " + rate(peak) + " tokens/s", 4, 12);
    g.textAlign = "right";
    g.fillText("now", width - 4, 12);
    g.textAlign = "left";
    $("throughput-caption").textContent = "tokens/s generated, the last " +
      Math.round(historyS / 60) + " minutes";
  }

  function layersText(rank, model) {
    if (!rank.layers) return "–";
    const [first, end] = rank.layers;
    const span = end - first === 1 ? String(first) : first + "–" + (end - 1);
    if (model && model.parallel === "tensor") return span + " (1/" + model.ranks + " of each)";
    return span + " (" + (end - first) + (end - first === 1 ? " layer)" : " layers)");
  }

  function gpuText(gpu) {
    const parts = ["GPU " + gpu.index + (gpu.name ? " " + gpu.name : "")];
    if (typeof gpu.memory_used === "number") parts.push(bytes(gpu.memory_used) + " of " + bytes(gpu.memory_total));
    if (typeof gpu.utilization_gpu === "number") parts.push(gpu.utilization_gpu + "% busy");
    if (typeof gpu.temperature_c === "number") parts.push(gpu.temperature_c + " °C");
    if (typeof gpu.power_draw_w === "number") parts.push(gpu.power_draw_w.toFixed(0) + " W");
    return parts.join(", ");
  }

  function renderRanks(ranks, model) {
    const rows = ranks.map((rank) => {
      const row = el("tr");
      row.dataset.rank = rank.rank;
      row.dataset.state = rank.state;
      const state = el("td");
      state.append(el("span", "state state-" + rank.state, rank.state), el("small", "detail", rank.detail));
      const host = el("td", "", rank.host || "–");
      if (rank.pid) host.append(el("small", "", "pid " + rank.pid));
      const device = el("td", "", rank.platform || "–");
      if (rank.device) device.title = rank.device;
      if (rank.cpus) device.append(el("small", "", "CPUs " + rank.cpus));
      const weights = rank.weight_bytes;
      const other = typeof rank.mlx_active_bytes === "number" && typeof weights === "number"
        ? Math.max(0, rank.mlx_active_bytes - weights) : null;
      const kv = el("td", "", bytes(other));
      if (typeof rank.mlx_peak_bytes === "number") kv.append(el("small", "", "MLX peak " + bytes(rank.mlx_peak_bytes)));
      const memory = el("td", "", bytes(rank.host_memory_available));
      if (typeof rank.host_memory_total === "number") memory.append(el("small", "", "of " + bytes(rank.host_memory_total)));
      if (typeof rank.reported_s_ago === "number" && rank.reported_s_ago > 5) {
        memory.append(el("small", "stale-note", "as of " + rank.reported_s_ago.toFixed(0) + " s ago"));
      }
      const gpus = el("td", "gpus");
      if (rank.gpus.length) for (const gpu of rank.gpus) gpus.append(el("div", "", gpuText(gpu)));
      else {
        gpus.append("none");
        if (rank.gpu_reason) gpus.append(el("small", "clip", rank.gpu_reason));
        gpus.title = rank.gpu_reason || "";
      }
      row.append(el("td", "", rank.rank), state, host, device, el("td", "", layersText(rank, model)),
        el("td", "", bytes(weights)), kv, memory, gpus);
      return row;
    });
    $("ranks").tBodies[0].replaceChildren(...rows);
  }

  // ---- conversations, kept in this browser

  let store = readJson(CONVERSATIONS_STORE, { items: [], active: null });
  if (!Array.isArray(store.items)) store = { items: [], active: null };

  function newId() {
    const bytes = crypto.getRandomValues(new Uint8Array(8));
    return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function active() {
    let conversation = store.items.find((c) => c.id === store.active);
    if (!conversation) {
      conversation = { id: newId(), title: "", messages: [], created: Date.now() };
      store.items.unshift(conversation);
      store.active = conversation.id;
    }
    return conversation;
  }

  function saveConversations() {
    writeJson(CONVERSATIONS_STORE, store);
  }

  function renderConversations() {
    const current = active();
    const items = store.items.map((conversation) => {
      const item = el("li", conversation.id === current.id ? "current" : "");
      const open = el("button", "open", conversation.title || "New chat");
      open.type = "button";
      open.addEventListener("click", () => {
        store.active = conversation.id;
        saveConversations();
        renderConversations();
      });
      const remove = el("button", "remove quiet", "×");
      remove.type = "button";
      remove.title = "Delete this chat";
      remove.addEventListener("click", () => {
        if (sending && sending.conversation === conversation) sending.controller.abort();
        store.items = store.items.filter((c) => c !== conversation);
        saveConversations();
        renderConversations();
      });
      item.append(open, remove);
      return item;
    });
    $("conversation-list").replaceChildren(...items);
    renderMessages();
  }

  $("new-conversation").addEventListener("click", () => {
    if (!active().messages.length) {
      $("prompt").focus(); // the open chat is still empty
      return;
    }
    const conversation = { id: newId(), title: "", messages: [], created: Date.now() };
    store.items.unshift(conversation);
    store.active = conversation.id;
    saveConversations();
    renderConversations();
    $("prompt").focus();
  });

  // ---- messages

  const elements = new Map(); // message -> its element, for re-rendering one while it streams

  function renderMessages() {
    const box = $("messages");
    elements.clear();
    const nodes = active().messages.map((message) => {
      const node = messageElement(message);
      elements.set(message, node);
      return node;
    });
    box.replaceChildren(...nodes);
    box.scrollTop = box.scrollHeight;
  }

  function messageElement(message) {
    const node = el("article", "msg " + message.role);
    node.dataset.status = message.status || "done";
    if (message.role === "user") {
      node.append(el("div", "user-text", message.content));
      return node;
    }
    if (message.reasoning) {
      const details = el("details", "reasoning");
      details.open = Boolean(message.reasoningOpen);
      details.addEventListener("toggle", () => { message.reasoningOpen = details.open; });
      const thinking = message.status === "streaming" && !message.content;
      details.append(el("summary", "", thinking ? "Thinking…" : "Reasoning"));
      const body = el("div", "markdown");
      body.append(window.RingMarkdown.render(message.reasoning));
      details.append(body);
      node.append(details);
    }
    if (message.content) {
      const body = el("div", "markdown content");
      body.append(window.RingMarkdown.render(message.content));
      node.append(body);
    }
    for (const call of message.toolCalls || []) {
      const box = el("div", "tool-call");
      box.append(el("div", "tool-name", "tool call: " + (call.name || "?")));
      let args = call.arguments || "";
      try {
        args = JSON.stringify(JSON.parse(args), null, 2);
      } catch (error) {
        // shown as the model wrote it (still streaming, or not JSON)
      }
      const pre = el("pre");
      pre.append(el("code", "", args));
      box.append(pre);
      node.append(box);
    }
    if (message.status === "streaming" && !message.content && !message.reasoning &&
        !(message.toolCalls || []).length) {
      node.append(el("div", "waiting", "…"));
    }
    const notes = [];
    if (message.status === "stopped") notes.push("stopped");
    if (message.usage) {
      const cached = message.usage.prompt_tokens_details?.cached_tokens;
      notes.push(message.usage.prompt_tokens + " prompt tokens" + (cached ? " (" + cached + " cached)" : ""));
      notes.push(message.usage.completion_tokens + " tokens");
    }
    if (message.elapsedS) notes.push("in " + message.elapsedS.toFixed(1) + " s");
    if (message.finish && message.finish !== "stop") notes.push("finish: " + message.finish);
    if (notes.length) node.append(el("div", "meta", notes.join(" · ")));
    if (message.error) node.append(el("div", "error", message.error));
    return node;
  }

  let renderTimer = null;

  function scheduleRender(message) {
    if (renderTimer) return;
    renderTimer = setTimeout(() => {
      renderTimer = null;
      rerender(message);
    }, RENDER_EVERY_MS);
  }

  function rerender(message) {
    const old = elements.get(message);
    if (!old) return;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    const node = messageElement(message);
    old.replaceWith(node);
    elements.set(message, node);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  // ---- settings

  const SETTING_INPUTS = {
    system: "set-system", temperature: "set-temperature", top_p: "set-top-p",
    max_tokens: "set-max-tokens", seed: "set-seed", thinking: "set-thinking", extra: "set-extra",
  };
  const settings = { ...DEFAULT_SETTINGS, ...readJson(SETTINGS_STORE, {}) };
  for (const [name, id] of Object.entries(SETTING_INPUTS)) {
    $(id).value = settings[name];
    $(id).addEventListener("change", () => {
      settings[name] = $(id).value;
      writeJson(SETTINGS_STORE, settings);
    });
  }

  function number(text) {
    return text === "" || text === null || isNaN(Number(text)) ? undefined : Number(text);
  }

  // The body of a chat request for `messages`; throws with a message a person can act on.
  function requestBody(messages) {
    for (const [name, id] of Object.entries(SETTING_INPUTS)) settings[name] = $(id).value;
    let extra = {};
    if (settings.extra.trim()) {
      try {
        extra = JSON.parse(settings.extra);
      } catch (error) {
        throw new Error("More request fields: not JSON (" + error.message + ")");
      }
      if (typeof extra !== "object" || extra === null || Array.isArray(extra)) {
        throw new Error("More request fields: give a JSON object, e.g. {\"stop\": [\"END\"]}");
      }
    }
    const body = {
      model: lastState && lastState.model ? lastState.model.model : "ringserve",
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: number(settings.temperature),
      top_p: number(settings.top_p),
      max_tokens: number(settings.max_tokens),
      seed: number(settings.seed),
    };
    if (settings.thinking) body.chat_template_kwargs = { enable_thinking: settings.thinking === "on" };
    return { ...body, ...extra, stream: true }; // the page reads the answer as a stream
  }

  function history(conversation) {
    const messages = settings.system.trim() ? [{ role: "system", content: settings.system }] : [];
    for (const message of conversation.messages) {
      if (message.role === "user") {
        messages.push({ role: "user", content: message.content });
        continue;
      }
      const calls = message.toolCalls || [];
      if (!message.content && !calls.length) continue; // an answer that never came
      const turn = { role: "assistant", content: message.content || "" };
      if (calls.length) {
        turn.tool_calls = calls.map((call) => ({
          id: call.id, type: "function", function: { name: call.name, arguments: call.arguments },
        }));
      }
      messages.push(turn);
    }
    return messages;
  }

  // ---- sending, streaming, stopping

  let sending = null; // { conversation, reply, controller }

  function showSending(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
  }

  async function send() {
    const text = $("prompt").value.trim();
    if (!text || sending) return;
    const conversation = active();
    let body;
    try {
      conversation.messages.push({ role: "user", content: text });
      body = requestBody(history(conversation));
      $("settings-error").hidden = true;
    } catch (error) {
      conversation.messages.pop();
      $("settings-error").textContent = error.message;
      $("settings-error").hidden = false;
      $("settings").open = true;
      return;
    }
    $("prompt").value = "";
    if (!conversation.title) conversation.title = text.slice(0, 60);
    const reply = { role: "assistant", content: "", reasoning: "", toolCalls: [], status: "streaming" };
    conversation.messages.push(reply);
    saveConversations();
    renderConversations();
    const controller = new AbortController();
    sending = { conversation, reply, controller };
    showSending(true);
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { ...authHeaders(), "Content-Type": "application/json", "X-Conversation-Id": conversation.id },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (response.ok) {
        await readStream(response, reply);
      } else {
        const answer = await response.json().catch(() => null);
        reply.status = "error";
        reply.error = (answer && answer.error && answer.error.message) || "HTTP " + response.status;
        if (response.status === 401) lock();
      }
    } catch (error) {
      if (error.name === "AbortError") {
        reply.status = "stopped";
      } else {
        reply.status = "error";
        reply.error = "the request failed: " + (error.message || error);
      }
    } finally {
      if (reply.status === "streaming") reply.status = "done";
      sending = null;
      showSending(false);
      saveConversations();
      clearTimeout(renderTimer);
      renderTimer = null;
      rerender(reply);
    }
  }

  async function readStream(response, reply) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const started = performance.now();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart()).join("\n");
        if (!data) continue; // a keep-alive
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          reply.status = "error";
          reply.error = chunk.error.message || "the answer failed";
          return;
        }
        if (chunk.usage) reply.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (delta.content) reply.content += delta.content;
          if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
          for (const call of delta.tool_calls || []) {
            const known = reply.toolCalls[call.index] ||
              (reply.toolCalls[call.index] = { id: "", name: "", arguments: "" });
            if (call.id) known.id = call.id;
            if (call.function && call.function.name) known.name += call.function.name;
            if (call.function && call.function.arguments) known.arguments += call.function.arguments;
          }
          if (choice.finish_reason) reply.finish = choice.finish_reason;
        }
        reply.elapsedS = (performance.now() - started) / 1000;
        scheduleRender(reply);
      }
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });

  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });

  $("stop").addEventListener("click", () => {
    if (sending) sending.controller.abort();
  });

  window.addEventListener("resize", () => {
    if (lastState) drawThroughput(lastState.throughput, lastState.history_s);
  });

  poll();
})();
