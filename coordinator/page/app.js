"use strict";
// The page's one script: the overview and a run's live output, from the JSON API and
// its server-sent events. Everything an agent or a participant wrote (output, names,
// subjects, reasons) is data: it reaches the document only as text (textContent,
// createTextNode), never as markup, and control characters are shown as escapes.

// -- helpers ------------------------------------------------------------------------------

// Unicode categories shown as escapes, as coordinator/display.py's `printable` does:
// controls (ESC among them), format characters (bidi overrides), surrogates, private use,
// unassigned, and the line and paragraph separators.
const HIDDEN = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}]/gu;

function escapeCode(ch) {
  const code = ch.codePointAt(0);
  if (code <= 0xff) return "\\x" + code.toString(16).padStart(2, "0");
  if (code <= 0xffff) return "\\u" + code.toString(16).padStart(4, "0");
  return "\\U" + code.toString(16).padStart(8, "0");
}

/** `text` with every control character as a visible escape; `multiline` keeps \n and \t. */
function printable(text, multiline = false) {
  return String(text ?? "").replace(HIDDEN, (ch) =>
    multiline && (ch === "\n" || ch === "\t") ? ch : escapeCode(ch));
}

/** An element with `className` and, optionally, text (always as text). */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = printable(text);
  return node;
}

function link(href, text, className) {
  const a = el("a", className, text);
  a.href = href;
  return a;
}

function cell(row, content, className) {
  const td = el("td", className);
  if (content instanceof Node) td.append(content);
  else if (content !== undefined && content !== null) td.textContent = printable(content);
  row.append(td);
  return td;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** An ISO time as local `YYYY-MM-DD HH:MM:SS` (the date left out when it is today). */
function when(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  const day = `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())}`;
  const time = `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
  const today = new Date();
  return t.toDateString() === today.toDateString() ? time : `${day} ${time}`;
}

function seconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 60) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

function runHref(runId) {
  return "#/runs/" + encodeURIComponent(runId);
}

function outcomeBadge(outcome) {
  const text = outcome || "unknown";
  // The class comes from a fixed list, never from the data itself.
  const known = ["ok", "failed", "running", "lost", "stopped", "timeout", "lock-lost"];
  const kind = known.includes(text) ? text : text.startsWith("skipped") ? "skipped" : "other";
  return el("span", "outcome o-" + kind, text);
}

async function getJSON(path) {
  const answer = await fetch(path, { headers: { Accept: "application/json" } });
  if (!answer.ok) throw new Error(await problem(answer));
  return answer.json();
}

/** The one line an error answer carries ({"error", "status"}), or its status. */
async function problem(answer) {
  try {
    const body = await answer.json();
    if (body && typeof body.error === "string") return body.error;
  } catch (_) { /* not JSON */ }
  return `${answer.status} ${answer.statusText}`;
}

let flashTimer = null;
function flash(message, bad = false) {
  const box = document.getElementById("flash");
  box.textContent = printable(message);
  box.classList.toggle("bad", bad);
  box.hidden = false;
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

// -- who is signed in, and the actions they may take ------------------------------------

const session = { person: null, csrf: null };

async function loadSession() {
  try {
    const answer = await fetch("/api/session", { headers: { Accept: "application/json" } });
    const body = answer.ok ? await answer.json() : null;
    session.person = body && body.person ? String(body.person) : null;
    session.csrf = body && body.csrf ? String(body.csrf) : null;
  } catch (_) {
    session.person = session.csrf = null;
  }
  const signedIn = session.person !== null;
  document.getElementById("person").textContent = printable(session.person || "");
  document.getElementById("signed-in").hidden = !signedIn;
  document.getElementById("sign-in").hidden = signedIn;
  document.getElementById("mail-box").hidden = !signedIn;
  document.body.classList.toggle("signed-in", signedIn);
  render();
}

/** POST JSON to an action endpoint with the CSRF token; the answer's body, or throws. */
async function act(path, body = {}) {
  const answer = await fetch(path, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "application/json",
      "X-CSRF-Token": session.csrf || "",
    },
    body: JSON.stringify(body),
  });
  if (!answer.ok) throw new Error(await problem(answer));
  try { return await answer.json(); } catch (_) { return {}; }
}

/** An action from `button`, disabled while it is under way (a stop waits for the end). */
async function attempt(button, what, path, body) {
  button.disabled = true;
  flash(`${what}…`);
  try {
    await act(path, body);
    flash(`${what}: done`);
    refreshSoon();
  } catch (err) {
    flash(`${what}: refused: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
}

function setUpForms() {
  document.getElementById("sign-in").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    try {
      const answer = await fetch("/api/session", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ token: input.value }),
      });
      if (!answer.ok) throw new Error(await problem(answer));
      input.value = "";
      await loadSession();
    } catch (err) {
      flash(`sign in: ${err.message}`, true);
    }
  });
  document.getElementById("sign-out").addEventListener("click", async () => {
    try {
      const answer = await fetch("/api/session", {
        method: "DELETE", headers: { "X-CSRF-Token": session.csrf || "" },
      });
      if (!answer.ok) throw new Error(await problem(answer));
    } catch (err) {
      flash(`sign out: ${err.message}`, true);
    }
    await loadSession();
  });
  document.getElementById("mail").addEventListener("submit", async (event) => {
    event.preventDefault();
    const to = document.getElementById("mail-to").value.trim();
    const subject = document.getElementById("mail-subject").value;
    const body = document.getElementById("mail-body").value;
    try {
      await act("/api/mail", { to, subject, body });
      flash(`mail sent to ${to}`);
      document.getElementById("mail-subject").value = "";
      document.getElementById("mail-body").value = "";
      refreshSoon();
    } catch (err) {
      flash(`mail to ${to}: refused: ${err.message}`, true);
    }
  });
  document.getElementById("run-stop").addEventListener("click", (event) => {
    if (current.runId) {
      attempt(event.currentTarget, `stop run ${current.runId}`,
        `/api/runs/${encodeURIComponent(current.runId)}/stop`, {});
    }
  });
}

// -- the overview -------------------------------------------------------------------------

const data = { agents: null, locks: null, runs: null, changelog: null, dead: null };
const sources = {
  agents: "/api/agents",
  locks: "/api/locks",
  runs: "/api/runs?limit=25",
  changelog: "/api/changelog?limit=15",
  dead: "/api/dead",
};

/**
 * Fetch `which` again, each shown as soon as it comes (/api/agents is the slow one: the
 * server looks at every agent, one look shared by the requests at the same moment).
 * `agentsMaxAge` (seconds) takes a look begun that long ago: not after an event.
 */
async function refresh(which = Object.keys(sources), agentsMaxAge = 0) {
  await Promise.all(which.map(async (name) => {
    const url = name === "agents" && agentsMaxAge ? `${sources.agents}?max_age=${agentsMaxAge}`
      : sources[name];
    try {
      data[name] = await getJSON(url);
    } catch (err) {
      data[name] = { error: err.message };
    }
    render();
  }));
}

/** A run event shown at once in the recent runs, until their refetch answers. */
function noteRun(event) {
  if (!Array.isArray(data.runs) || !event.run_id) return;
  const known = data.runs.find((run) => run.run_id === event.run_id);
  if (event.kind === "run.started" && !known) {
    data.runs = [...data.runs, {
      agent: event.agent, run_id: event.run_id, trigger: event.trigger || null,
      started_at: event.at, duration_seconds: null, outcome: "running", reason: null,
    }];
  } else if (event.kind === "run.finished" && known) {
    Object.assign(known, {
      outcome: event.outcome || known.outcome,
      duration_seconds: event.duration_seconds ?? known.duration_seconds,
      reason: event.reason || null,
    });
  } else {
    return;
  }
  render();
}

// Events come in bursts, and /api/agents costs the server a look at every agent: one
// refetch at a time, shortly after the first event; events during it ask for one more.
let refreshTimer = null;
let refreshing = false;
let refreshAgain = false;
function refreshSoon() {
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    refreshing = true;
    try {
      await Promise.all([
        refresh(["agents", "locks", "runs"]),
        current.runId ? loadRecord(current.runId) : null,
      ]);
    } finally {
      refreshing = false;
    }
    if (refreshAgain) {
      refreshAgain = false;
      refreshSoon();
    }
  }, 100);
}

function fill(tableId, rows, makeRow, empty) {
  const body = document.querySelector(`#${tableId} tbody`) || document.getElementById(tableId);
  const columns = document.querySelectorAll(`#${tableId} thead th`).length || 1;
  const made = [];
  if (rows && rows.error) {
    made.push(note(columns, `cannot load: ${rows.error}`, "bad"));
  } else if (rows === null) {
    made.push(note(columns, "loading…"));
  } else if (rows.length === 0) {
    made.push(note(columns, empty));
  } else {
    for (const row of rows) made.push(makeRow(row));
  }
  body.replaceChildren(...made);

  function note(span, text, className) {
    if (body.tagName === "OL") return el("li", "note " + (className || ""), text);
    const tr = el("tr", "note " + (className || ""));
    const td = cell(tr, text);
    td.colSpan = span;
    return tr;
  }
}

function holderText(holder) {
  if (!holder) return "someone (not known yet)";
  return `${holder.agent} on ${holder.host}`;
}

function runningRunOf(name) {
  if (!Array.isArray(data.runs)) return null;
  const running = data.runs.filter((r) => r.agent === name && r.outcome === "running");
  return running.length ? running[running.length - 1].run_id : null;
}

function agentRow(agent) {
  const tr = el("tr");
  tr.dataset.agent = agent.name;
  cell(tr, agent.name, "name");
  // Its live run: the holder of its own lock, else a recent run recorded as running
  // (an agent with `lock = "none"` holds no lock a status could see).
  const live = agent.run ? agent.run.run_id : runningRunOf(agent.name);
  const shownState = live && agent.state === "idle" ? "running" : agent.state;
  const state = cell(tr, null);
  state.append(el("span", "state s-" + (["running", "idle", "broken"].includes(shownState)
    ? shownState : "other"), shownState));
  if (live) state.append(" ", link(runHref(live), "watch", "watch"));
  if (agent.problem) state.append(el("div", "problem", agent.problem));
  cell(tr, agent.pending === null ? "–" : String(agent.pending), "num");
  const lock = cell(tr, agent.lock);
  const holders = (agent.lock_holders || []).filter((h) => !h || h.agent !== agent.name);
  if (agent.lock !== "none" && holders.length > 0) {
    lock.append(el("div", "holders", "held by " + holders.map(holderText).join(", ")));
  }
  const last = cell(tr, null);
  if (agent.last_run) {
    last.append(outcomeBadge(agent.last_run.outcome), " ",
      link(runHref(agent.last_run.run_id), when(agent.last_run.started_at), "when"));
  }
  cell(tr, agent.next_run ? when(agent.next_run) : agent.schedule ? "" : "–");
  const acts = cell(tr, null, "acts");
  if (session.person) {
    const run = el("button", "small run-now", "run now");
    run.type = "button";
    run.addEventListener("click", () => attempt(run, `run ${agent.name} now`,
      `/api/agents/${encodeURIComponent(agent.name)}/run`, {}));
    acts.append(run);
    if (live) {
      const stop = el("button", "small danger stop", "stop");
      stop.type = "button";
      stop.addEventListener("click", () => attempt(stop, `stop ${agent.name}'s run`,
        `/api/runs/${encodeURIComponent(live)}/stop`, {}));
      acts.append(" ", stop);
    }
  }
  return tr;
}

function lockRow(lock) {
  const tr = el("tr");
  cell(tr, lock.name, "name");
  cell(tr, String(lock.slots), "num");
  const held = cell(tr, null);
  if (lock.holders.length === 0) held.textContent = "free";
  for (const holder of lock.holders) {
    const line = el("div", null, holderText(holder));
    if (holder) {
      line.append(" (", link(runHref(holder.run_id), holder.run_id, "mono"),
        holder.since ? `, since ${when(holder.since)})` : ")");
    }
    held.append(line);
  }
  return tr;
}

function runRow(run) {
  const tr = el("tr");
  tr.dataset.run = run.run_id;
  cell(tr, link(runHref(run.run_id), run.run_id, "mono"));
  cell(tr, run.agent, "name");
  cell(tr, run.trigger || "");
  cell(tr, when(run.started_at));
  cell(tr, seconds(run.duration_seconds), "num");
  const outcome = cell(tr, outcomeBadge(run.outcome));
  if (run.reason) outcome.append(el("div", "reason", run.reason));
  return tr;
}

function entryItem(entry) {
  const li = el("li");
  const head = el("div", "entry-head");
  head.append(el("span", "when", when(entry.created_at)), " ",
    el("span", "author" + (entry.verified ? " verified" : " unverified"),
      entry.author + (entry.verified ? "" : " (unverified)")), " ",
    el("b", "summary", entry.summary));
  for (const tag of entry.tags || []) head.append(" ", el("span", "tag", tag));
  li.append(head);
  if (entry.body) li.append(el("div", "body", printable(entry.body, true)));
  return li;
}

function deadRow(letter) {
  const tr = el("tr");
  cell(tr, letter.id.slice(0, 12), "mono");
  cell(tr, letter.reason);
  cell(tr, letter.routing_key || letter.queue);
  cell(tr, (letter.signed_by || "–") + (letter.verified ? "" : " (unverified)"));
  cell(tr, when(letter.dead_at));
  cell(tr, letter.warning ? `${letter.detail} — ${letter.warning}` : letter.detail);
  return tr;
}

function renderOverview() {
  // Newest first on the page; the API answers oldest first.
  const newestFirst = (rows) => (Array.isArray(rows) ? [...rows].reverse() : rows);
  fill("agents", data.agents, agentRow, "no agents in the roster");
  fill("locks", data.locks, lockRow, "no locks");
  fill("runs", newestFirst(data.runs), runRow, "no runs yet");
  fill("changelog", newestFirst(data.changelog), entryItem, "nothing in the changelog");
  fill("dead", data.dead, deadRow, "no dead letters");
  const names = Array.isArray(data.agents) ? data.agents.map((a) => "agent:" + a.name) : [];
  document.getElementById("recipients").replaceChildren(...names.map((name) => {
    const option = el("option");
    option.value = name;
    return option;
  }));
}

// -- a run's page -------------------------------------------------------------------------

const current = {
  runId: null,
  source: null, // its session's EventSource
  lastId: -1, // the newest event id shown: an event at or below it is a replay
  expired: new Set(), // the `expired` notices shown (they have no id)
  tokens: null, // the element tokens are appended to, while they come
  record: null,
  closed: null, // the `closed` event's data, once it came
};

function showRun(runId) {
  stopFollowing();
  Object.assign(current, {
    runId, lastId: -1, expired: new Set(), tokens: null, record: null, closed: null,
  });
  document.getElementById("run-id").textContent = printable(runId);
  document.getElementById("run-agent").textContent = "";
  document.getElementById("run-facts").replaceChildren();
  document.getElementById("output").replaceChildren();
  document.getElementById("run-dropped").hidden = true;
  pending = [];
  followEnd = true;
  dropped = 0;
  document.getElementById("run-status").textContent = "";
  document.getElementById("run-progress").hidden = true;
  document.getElementById("run-progress-text").textContent = "";
  const end = document.getElementById("run-end");
  end.hidden = true;
  end.replaceChildren();
  loadRecord(runId);
  follow(runId);
  renderRun();
}

async function loadRecord(runId) {
  try {
    const record = await getJSON(`/api/runs/${encodeURIComponent(runId)}`);
    if (current.runId === runId) current.record = record;
  } catch (_) {
    // Not recorded yet (or no longer): the session still says what it can.
  }
  renderRun();
}

function stopFollowing() {
  if (current.source) current.source.close();
  current.source = null;
}

const SESSION_KINDS = ["opened", "line", "progress", "token", "tool", "status", "result",
  "missing", "expired", "closed"];

function follow(runId) {
  const source = new EventSource(`/api/sessions/${encodeURIComponent(runId)}/events`);
  current.source = source;
  for (const kind of SESSION_KINDS) {
    source.addEventListener(kind, (message) => {
      if (current.source === source) onSessionEvent(kind, message);
    });
  }
  source.addEventListener("end", () => {
    // The run is over and every event was sent: closed, so it does not reconnect.
    source.close();
    if (current.source === source) {
      current.source = null;
      endTokens();
      renderRun();
    }
  });
  source.addEventListener("open", () => renderRun());
  source.addEventListener("error", () => {
    if (current.source !== source) return;
    if (source.readyState === EventSource.CLOSED) {
      current.source = null;
      // After its `closed`, a 204: the server says the run ended at the last id this
      // page saw (its `end` was lost with the connection). Before it, a refusal (an
      // unknown run, or retention removed it): say why, from the API.
      if (current.closed) endTokens();
      else explainRefusal(runId);
    }
    renderRun();
  });
}

async function explainRefusal(runId) {
  let message = "cannot follow this run's output";
  try {
    const answer = await fetch(`/api/sessions/${encodeURIComponent(runId)}/events`,
      { headers: { Accept: "text/event-stream" } });
    if (!answer.ok) message = await problem(answer);
    else if (answer.body) answer.body.cancel();
  } catch (_) { /* keep the generic message */ }
  if (current.runId === runId) {
    output(el("div", "ev notice", message));
  }
}

function parse(message) {
  try {
    const value = JSON.parse(message.data);
    return value && typeof value === "object" ? value : { text: String(value) };
  } catch (_) {
    return { text: message.data };
  }
}

// New entries wait for the next frame and go in together: a replay can bring
// thousands at once, and the page lays out and scrolls once a frame, not once a line.
// The output follows its end while the reader is there, and stays put when they scroll
// up. Beyond MAX_SHOWN entries the oldest leave the page (the run log, `covey attach`
// and the session itself keep them all): a browser tab is not an archive.
const MAX_SHOWN = 10000;
let pending = [];
let followEnd = true;
let ownScroll = -1; // the scrollTop the page set itself (its scroll event is not the reader's)
let dropped = 0;

function output(node) {
  pending.push(node);
  if (pending.length === 1) {
    // The next frame, or 50 ms: a window the browser draws seldom (behind
    // another, or headless) may wait long for its frames, and its text must not.
    requestAnimationFrame(flush);
    setTimeout(flush, 50);
  }
}

function flush() {
  if (pending.length === 0) return; // the other of the two came first
  const box = document.getElementById("output");
  box.append(...pending);
  pending = [];
  const over = box.childElementCount - MAX_SHOWN;
  if (over > 0) {
    for (let i = 0; i < over; i++) box.firstElementChild.remove();
    dropped += over;
    const note = document.getElementById("run-dropped");
    note.textContent = `${dropped} earlier entries are no longer shown here; `
      + "covey attach shows them all";
    note.hidden = false;
  }
  if (followEnd) {
    box.scrollTop = box.scrollHeight;
    ownScroll = box.scrollTop;
  }
}

function watchScrolling() {
  const box = document.getElementById("output");
  box.addEventListener("scroll", () => {
    if (box.scrollTop === ownScroll) return;
    followEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  });
}

function endTokens() {
  current.tokens = null;
}

function onSessionEvent(kind, message) {
  // Ids only grow: one at or below the newest shown is a replay after a reconnect.
  const event = parse(message);
  if (kind === "expired") {
    // A notice with no SSE id of its own (it stands for no stored event), told again
    // after a reconnect: shown once for the ids it names.
    const key = JSON.stringify(event.data || null);
    if (current.expired.has(key)) return;
    current.expired.add(key);
  } else if (message.lastEventId !== "") {
    const id = Number(message.lastEventId);
    if (Number.isFinite(id)) {
      if (id <= current.lastId) return;
      current.lastId = id;
    }
  }
  const text = event.text ?? "";
  const info = event.data && typeof event.data === "object" ? event.data : {};
  if (event.agent && !document.getElementById("run-agent").textContent) {
    document.getElementById("run-agent").textContent = printable(event.agent);
  }
  if (kind === "token") {
    if (current.tokens === null) {
      current.tokens = el("div", "ev tokens");
      current.tokens.dataset.id = message.lastEventId;
      output(current.tokens);
    }
    current.tokens.append(document.createTextNode(printable(text, true)));
    return;
  }
  endTokens();
  const row = el("div", "ev " + kind);
  row.dataset.id = message.lastEventId;
  if (kind === "line") {
    row.textContent = printable(text);
  } else if (kind === "progress") {
    const fraction = Number(info.fraction);
    const bar = document.getElementById("run-progress");
    if (Number.isFinite(fraction)) {
      bar.value = Math.min(1, Math.max(0, fraction));
      bar.hidden = false;
    }
    const percent = Number.isFinite(fraction) ? `${Math.round(fraction * 100)}%` : "?%";
    document.getElementById("run-progress-text").textContent = printable(`${percent} ${text}`);
    row.append(el("span", "mark", `progress ${percent}`), " ", el("span", null, text));
  } else if (kind === "opened") {
    const command = Array.isArray(info.command) ? info.command.join(" ") : info.command || "";
    row.append(el("span", "mark", "opened"), " ",
      el("span", null, `run of ${event.agent || "?"}${command ? ": " + command : ""}`));
  } else if (kind === "closed") {
    current.closed = info;
    row.append(el("span", "mark", "closed"), " ", outcomeBadge(info.outcome),
      el("span", null, closedText(info)));
  } else if (kind === "missing") {
    const seqs = Array.isArray(info.seqs) ? info.seqs.map((r) => r.join("-")).join(", ") : "?";
    row.append(el("span", "mark", "missing"), " ", el("span", null,
      `events (seq ${seqs}) could not be published; ${info.log || "the run log"} has every line`));
  } else if (kind === "expired") {
    row.append(el("span", "mark", "expired"), " ", el("span", null,
      `${text || "retention removed these events"}; the run log on its host has every line`));
  } else {
    // tool, status, result: marked, with the agent's text beside the mark
    if (kind === "status") document.getElementById("run-status").textContent = printable(text);
    row.append(el("span", "mark", kind), " ", el("span", null, text));
  }
  output(row);
  if (kind === "closed") renderRun();
}

function closedText(info) {
  const code = info.exit_code;
  return (code !== null && code !== undefined ? ` (exit code ${code})` : "")
    + (info.reason ? `: ${info.reason}` : "");
}

function renderRun() {
  if (!current.runId) return;
  const record = current.record;
  const closed = current.closed;
  if (record && !document.getElementById("run-agent").textContent) {
    document.getElementById("run-agent").textContent = printable(record.agent);
  }
  const outcome = closed ? closed.outcome : record ? record.outcome : null;
  const live = !closed && (record ? record.outcome === "running" : current.source !== null);
  const state = document.getElementById("run-state");
  state.replaceChildren(outcomeBadge(outcome || (current.source ? "running" : "unknown")));
  if (current.source) {
    state.append(" ", el("span", "following",
      current.source.readyState === EventSource.OPEN ? "live" : "connecting…"));
  }
  document.getElementById("run-stop").hidden = !(live && session.person);
  const facts = document.getElementById("run-facts");
  const items = [];
  const fact = (name, value) => {
    if (value === null || value === undefined || value === "") return;
    items.push(el("dt", null, name), el("dd", null, value));
  };
  if (record) {
    fact("trigger", record.trigger);
    fact("host", record.host);
    fact("started", when(record.started_at));
    fact("finished", when(record.finished_at));
    fact("took", seconds(record.duration_seconds));
    fact("stopped by", record.stopped_by);
  }
  facts.replaceChildren(...items);
  const end = document.getElementById("run-end");
  if (closed) {
    end.replaceChildren("ended: ", outcomeBadge(closed.outcome),
      document.createTextNode(printable(closedText(closed))));
    end.hidden = false;
  }
}

// -- the control channel: what makes the overview live -----------------------------------

const CONTROL_KINDS = ["run.requested", "run.started", "run.finished", "lock.acquired",
  "lock.released", "session.opened", "session.closed", "stop.requested"];
const RETRY_SECONDS = 10; // to reopen /api/events after the server refused it
const SLOW_REFRESH_SECONDS = 30; // the changelog and dead letters have no events of their own
let control = null;

function listen() {
  const source = new EventSource("/api/events");
  control = source;
  const live = document.getElementById("live");
  const onEvent = (message) => {
    refreshSoon();
    const event = parse(message);
    noteRun(event);
    if (current.runId && event.run_id === current.runId) loadRecord(current.runId);
  };
  for (const kind of CONTROL_KINDS) source.addEventListener(kind, onEvent);
  source.addEventListener("message", onEvent);
  source.addEventListener("open", () => {
    live.textContent = "live";
    live.classList.add("on");
  });
  // The server's listener is bound: nothing is missed from here on. Look again, for
  // what happened before (or, `resumed`, while its own connection to the broker was down).
  source.addEventListener("listening", () => refresh());
  source.addEventListener("error", () => {
    live.classList.remove("on");
    if (source.readyState === EventSource.CLOSED) {
      // Refused, not a dropped connection (which EventSource retries by itself): the
      // overview refreshes on a timer until it answers again.
      live.textContent = "not live: refreshing every " + RETRY_SECONDS + " s";
      control = null;
      setTimeout(() => { refresh(); listen(); }, RETRY_SECONDS * 1000);
    } else {
      live.textContent = "reconnecting…";
    }
  });
}

// -- routes -------------------------------------------------------------------------------

function route() {
  const match = /^#\/runs\/([^/]+)$/.exec(location.hash);
  const runId = match ? decodeURIComponent(match[1]) : null;
  document.getElementById("overview").hidden = runId !== null;
  document.getElementById("run").hidden = runId === null;
  if (runId !== null) {
    if (runId !== current.runId) showRun(runId);
    document.title = `covey · run ${runId}`;
  } else {
    stopFollowing();
    current.runId = null;
    document.title = "covey";
    render();
  }
}

function render() {
  if (current.runId) renderRun();
  else renderOverview();
}

function start() {
  setUpForms();
  watchScrolling();
  window.addEventListener("hashchange", route);
  route();
  loadSession();
  refresh();
  listen();
  setInterval(() => refresh(undefined, SLOW_REFRESH_SECONDS / 2), SLOW_REFRESH_SECONDS * 1000);
}

start();
