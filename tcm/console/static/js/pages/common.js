// What several pages share: the agents snapshot with its live deltas, simple tables.
import { api } from "../api.js";
import { h, message } from "../dom.js";

// Agents per request: the whole list is about 0.5 kB an agent (5 MB at 10,000), read in
// pages so that a page can draw the first ones while the rest arrive.
const AGENT_PAGE = 1000;

// Agent rows by id (in id order), kept current by `agent` events (mode, via, state...).
// `onPage(agents)`, if given, is called after each page with the rows so far.
export async function loadAgents(onPage) {
  const agents = new Map();
  let after = null;
  for (;;) {
    const cursor = after === null ? "" : `&after=${encodeURIComponent(after)}`;
    const page = await api("GET", `/agents?limit=${AGENT_PAGE}${cursor}`);
    for (const a of page.agents) agents.set(a.id, a);
    if (onPage) onPage(agents);
    if (!page.next) return agents;
    after = page.next;
  }
}

export async function applyAgentEvents(agents, events) {
  const fresh = [];
  for (const e of events) {
    if (e.kind !== "agent") continue; // (`node` events: a task server's or gateway's link)
    const row = agents.get(e.id);
    if (!row || e.new) {
      fresh.push(e.id);
      continue;
    }
    const { kind, key, new: _n, ...fields } = e;
    Object.assign(row, fields);
  }
  for (const id of fresh) {
    try {
      agents.set(id, await api("GET", `/agents/${encodeURIComponent(id)}`));
    } catch {
      /* deleted meanwhile: the next listing says so */
    }
  }
}

// A plain table of a few hundred rows at most (audit, targets, nodes): cells as text.
export function table(columns, rows, { empty = "Nothing yet.", label } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    { class: "grid", "aria-label": label || null },
    h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", {}, title)))),
    h(
      "tbody",
      {},
      rows.map((r) =>
        h(
          "tr",
          {},
          columns.map(([, value]) => {
            const v = value(r);
            return h("td", {}, v instanceof Node ? v : v === null || v === undefined ? "" : String(v));
          }),
        ),
      ),
    ),
  );
}

// Run `action` (an async function), showing its refusal (the server's reason) in `where`.
export async function attempt(where, action, success) {
  where.replaceChildren();
  try {
    const result = await action();
    if (success) where.append(message("ok", success(result)));
    return result;
  } catch (e) {
    where.append(message("error", e.message));
    return undefined;
  }
}

export function section(title, ...children) {
  return h("section", {}, h("h2", {}, title), ...children);
}
