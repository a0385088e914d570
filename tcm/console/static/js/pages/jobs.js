// Jobs: the list, and one job's page (/console/jobs/JOB_ID) with live counts, a row per
// target (agent id and state as text), streamed output, filters, CSV, save as target, cancel.
import { api, apiBlob, live } from "../api.js";
import { clear, downloadBlob, fmtTime, h, message } from "../dom.js";
import { VTable } from "../vtable.js";
import { attempt, table } from "./common.js";

const STATES = ["pending", "delivered", "running", "succeeded", "failed", "expired", "canceled", "unsupported"];
const SHOWN = ["pending", "delivered", "running", "succeeded", "failed", "expired", "not_connected"];
const RANK = { pending: 0, delivered: 1, running: 2 }; // any other state is final (3)
const rank = (s) => (s in RANK ? RANK[s] : 3);
const MAX_OUTPUT = 256 * 1024; // characters of output kept per target in the page

export async function jobs(main, ctx) {
  const box = h("div");
  clear(main, h("h1", {}, "Jobs"), box);
  const load = async () => {
    const page = await api("GET", "/jobs?limit=200");
    clear(
      box,
      table(
        [
          ["Job", (j) => h("a", { href: `/console/jobs/${encodeURIComponent(j.id)}`, onclick: (ev) => { ev.preventDefault(); ctx.navigate(`jobs/${encodeURIComponent(j.id)}`); } }, j.id)],
          ["Action", (j) => j.action],
          ["Created", (j) => fmtTime(j.created_at)],
          ["By", (j) => j.created_by],
          ["Targets", (j) => Object.values(j.states || {}).reduce((a, b) => a + b, 0)],
          ["States", (j) => Object.entries(j.states || {}).map(([s, n]) => `${s} ${n}`).join(", ")],
        ],
        page.jobs,
        { empty: "No jobs yet.", label: "jobs" },
      ),
    );
  };
  let timer = null;
  const view = live(["jobs"], {
    load,
    apply: () => {
      if (!timer) timer = setTimeout(() => { timer = null; load(); }, 1000);
    },
    onStatus: ctx.onLive,
  });
  ctx.cleanup.push(() => { view.stop(); clearTimeout(timer); });
  await view.ready;
}

export async function job(main, ctx) {
  const id = ctx.params.job;
  // whether each target's agent can be reached (a session or polling), from the snapshot's
  // `reason` and then the agents' live events: a big job's page does not load every agent
  const reachable = new Map();
  const rows = new Map(); // agent id -> row
  let shownState = "";
  let detail = null; // the agent whose output is open
  const countsBox = h("div", { class: "counts tiles", id: "job-counts" });
  const head = h("div", { class: "job-head" });
  const result = h("div", { class: "result" });
  const output = h("pre", { class: "output", id: "job-output", "aria-label": "output" });
  const outputTitle = h("h2", {}, "Output");
  const stateFilter = h(
    "select",
    { id: "state-filter", "aria-label": "filter by state" },
    h("option", { value: "" }, "every state"),
    [...STATES, "not_connected"].map((s) => h("option", { value: s }, s.replace("_", " "))),
  );
  const targetName = h("input", { id: "job-target-name", placeholder: "target name", "aria-label": "target name" });
  const stateOf = (r) => (r.state === "pending" && reachable.get(r.agent) === false ? "not_connected" : r.state);
  const lastLine = (text) => {
    const lines = text.trimEnd().split("\n");
    return lines[lines.length - 1] || "";
  };
  const vt = new VTable({
    columns: [
      { key: "agent", title: "Agent id", width: "15.5em", text: (r) => r.agent },
      { key: "state", title: "State", width: "8em", text: (r) => stateOf(r).replace("_", " "), cls: (r) => `state-${r.state}` },
      { key: "delivered_at", title: "Delivered", width: "11.5em", text: (r) => fmtTime(r.delivered_at) },
      { key: "started_at", title: "Started", width: "11.5em", text: (r) => fmtTime(r.started_at) },
      { key: "finished_at", title: "Finished", width: "11.5em", text: (r) => fmtTime(r.finished_at) },
      { key: "exit_code", title: "Exit", width: "4em", text: (r) => (r.exit_code ?? "") },
      { key: "error", title: "Error / reason", width: "minmax(8em,1.5fr)", text: (r) => r.error || r.reason || "" },
      { key: "output", title: "Output (last line)", width: "minmax(8em,2fr)", text: (r) => lastLine(r.output) },
    ],
    key: (r) => r.agent,
    height: Math.max(240, window.innerHeight - 520),
    label: "targets",
    onRow: (r) => {
      detail = r.agent;
      showOutput();
    },
  });
  const showOutput = () => {
    const r = rows.get(detail) || [...rows.values()].find((x) => x.output) || null;
    outputTitle.textContent = r ? `Output of ${r.agent}` : "Output";
    const text = r ? r.output : "";
    if (output.textContent !== text) output.textContent = text;
  };
  const drawCounts = () => {
    const counts = Object.fromEntries(SHOWN.map((s) => [s, 0]));
    let other = 0;
    for (const r of rows.values()) {
      const s = stateOf(r);
      if (s in counts) counts[s] += 1;
      else other += 1;
    }
    clear(
      countsBox,
      SHOWN.map((s) =>
        h(
          "div",
          { class: `tile state-${s}`, dataset: { count: s } },
          h("span", { class: "n" }, String(counts[s])),
          h("span", { class: "t" }, s.replace("_", " ")),
        ),
      ),
      other ? h("div", { class: "tile", dataset: { count: "other" } }, h("span", { class: "n" }, String(other)), h("span", { class: "t" }, "canceled / unsupported")) : null,
      h("div", { class: "tile", dataset: { count: "total" } }, h("span", { class: "n" }, String(rows.size)), h("span", { class: "t" }, "total")),
    );
  };
  const draw = () => {
    const list = [...rows.values()].filter((r) => !shownState || stateOf(r) === shownState);
    vt.setRows(list);
    drawCounts();
    showOutput();
  };
  stateFilter.addEventListener("change", () => {
    shownState = stateFilter.value;
    draw();
  });
  const addOutput = (r, seq, text) => {
    if (r.seen.has(seq)) return;
    r.seen.add(seq);
    r.output += text;
    if (r.output.length > MAX_OUTPUT) r.output = r.output.slice(-MAX_OUTPUT);
  };
  const load = async () => {
    const [status, out] = await Promise.all([
      api("GET", `/jobs/${encodeURIComponent(id)}`),
      api("GET", `/jobs/${encodeURIComponent(id)}/output`),
    ]);
    rows.clear();
    reachable.clear();
    for (const t of status.results) {
      reachable.set(t.agent, t.reason !== "not connected");
      const res = t.result && typeof t.result === "object" ? t.result : {};
      rows.set(t.agent, { ...t, exit_code: res.exit_code ?? null, output: "", seen: new Set() });
    }
    for (const chunk of out.output) {
      const r = rows.get(chunk.agent_id);
      if (r) addOutput(r, chunk.seq, chunk.text);
    }
    clear(
      head,
      h("h1", {}, `Job ${status.id}`),
      h(
        "p",
        { class: "meta" },
        `${status.action} · created ${fmtTime(status.created_at)} by ${status.created_by || "?"} · expires ${fmtTime(status.expires_at)}`,
      ),
      h("pre", { class: "args" }, JSON.stringify(status.args ?? {})),
    );
    draw();
  };
  const apply = async (events) => {
    for (const e of events) {
      if (e.kind === "target" && e.job === id) {
        const r = rows.get(e.agent);
        if (!r || rank(e.state) < rank(r.state)) continue;
        if (rank(r.state) === 3 && !e.final) continue;
        r.state = e.state;
        if (e.state === "delivered" && !r.delivered_at) r.delivered_at = e.at;
        if (e.state === "running" && !r.started_at) r.started_at = e.at;
        if (e.final) {
          r.finished_at = r.finished_at || e.at;
          if (e.exit_code !== undefined) r.exit_code = e.exit_code;
          r.error = e.error;
          r.reason = null;
        }
      } else if (e.kind === "output" && e.job === id) {
        const r = rows.get(e.agent);
        if (r) addOutput(r, e.seq, e.text);
      } else if (e.kind === "agent" && e.mode && rows.has(e.id)) {
        reachable.set(e.id, e.mode === "persistent" || e.mode === "http");
      }
    }
    draw();
  };
  const view = live([`job:${id}`, "agents"], {
    load,
    apply,
    onStatus: ctx.onLive,
    onError: (e) => clear(result, message("error", `Job ${id}: ${e.message}`)),
  });
  ctx.cleanup.push(() => view.stop());
  clear(
    main,
    head,
    countsBox,
    h(
      "div",
      { class: "toolbar" },
      stateFilter,
      targetName,
      h(
        "button",
        {
          onclick: () =>
            attempt(
              result,
              () => {
                const body = { name: targetName.value.trim(), from_job: id };
                if (shownState && shownState !== "not_connected") body.state = shownState;
                return api("POST", "/targets", body);
              },
              (t) => `Target ${t.name} saved.`,
            ),
        },
        "Save shown state's agents as target",
      ),
      h(
        "button",
        {
          onclick: () =>
            attempt(result, async () => downloadBlob(`job-${id}.csv`, await apiBlob(`/jobs/${encodeURIComponent(id)}/results.csv`))),
        },
        "CSV",
      ),
      h(
        "button",
        {
          id: "cancel-job",
          onclick: () =>
            attempt(
              result,
              () => api("POST", `/jobs/${encodeURIComponent(id)}/cancel`, {}),
              (r) => `Canceled ${r.canceled.length}, told ${r.stopping.length} running to stop.`,
            ),
        },
        "Cancel",
      ),
    ),
    result,
    vt.el,
    outputTitle,
    output,
  );
  await view.ready;
}
