// Overview: agents by how they are connected, jobs running, task servers and gateways.
import { api, live } from "../api.js";
import { clear, h } from "../dom.js";
import { applyAgentEvents, loadAgents, section, table } from "./common.js";

const COUNTS = [
  ["persistent", "Persistent", (a) => a.mode === "persistent" && a.state === "ok"],
  ["http", "HTTP", (a) => a.mode === "http" && a.state === "ok"],
  ["offline", "Offline", (a) => a.mode === "offline" && a.state === "ok"],
  ["awaiting", "Awaiting approval", (a) => a.state === "awaiting approval"],
  ["revoked", "Revoked", (a) => a.state === "revoked"],
];

export async function overview(main, ctx) {
  let agents = new Map();
  let status = {};
  const tiles = h("div", { class: "tiles" });
  const nodesBox = h("div");
  clear(
    main,
    h("h1", {}, "Overview"),
    tiles,
    section("Task servers and gateways", nodesBox),
  );
  const draw = () => {
    const rows = [...agents.values()];
    clear(
      tiles,
      COUNTS.map(([key, title, test]) =>
        h(
          "div",
          { class: `tile tile-${key}`, dataset: { count: key } },
          h("span", { class: "n" }, String(rows.filter(test).length)),
          h("span", { class: "t" }, title),
        ),
      ),
      h(
        "div",
        { class: "tile", dataset: { count: "jobs" } },
        h("span", { class: "n" }, String(status.active_jobs ?? 0)),
        h("span", { class: "t" }, "Jobs running"),
      ),
      h(
        "div",
        { class: "tile", dataset: { count: "agents" } },
        h("span", { class: "n" }, String(rows.length)),
        h("span", { class: "t" }, "Agents enrolled"),
      ),
    );
  };
  const loadNodes = async () => {
    const [ts, gw] = await Promise.all([api("GET", "/taskservers"), api("GET", "/gateways")]);
    const servers = Array.isArray(ts) ? ts : ts.taskservers || [];
    clear(
      nodesBox,
      table(
        [
          ["Task server", (t) => t.name],
          ["State", (t) => t.state],
          ["Sessions", (t) => t.clients],
          ["Assigned agents", (t) => t.assigned],
          ["Max", (t) => t.max_clients],
          ["Why", (t) => t.reason || ""],
        ],
        servers,
        { empty: "No task servers.", label: "task servers" },
      ),
      table(
        [
          ["Gateway", (g) => g.name],
          ["State", (g) => g.state],
          ["Sessions", (g) => g.sessions],
          ["Task sessions", (g) => g.task_sessions],
          ["Worker links", (g) => (g.links || []).length],
        ],
        gw.gateways || [],
        { empty: "No gateways.", label: "gateways" },
      ),
    );
  };
  let statusTimer = null;
  const refreshStatus = () => {
    if (statusTimer) return;
    statusTimer = setTimeout(async () => {
      statusTimer = null;
      status = await api("GET", "/status");
      draw();
    }, 500);
  };
  const view = live(["agents", "jobs"], {
    load: async () => {
      [agents, status] = await Promise.all([loadAgents(), api("GET", "/status")]);
      draw();
      await loadNodes();
    },
    apply: async (events) => {
      await applyAgentEvents(agents, events);
      if (events.some((e) => e.kind === "job")) refreshStatus();
      if (events.some((e) => e.kind === "node")) loadNodes();
      if (events.some((e) => e.kind === "target" && e.final)) refreshStatus();
      draw();
    },
    onStatus: ctx.onLive,
  });
  ctx.cleanup.push(() => {
    view.stop();
    clearTimeout(statusTimer);
  });
  await view.ready;
}
