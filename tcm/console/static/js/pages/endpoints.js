// Endpoints: every agent in a virtualized table, filtered with the target filter language
// (the server parses it; its error is shown at its position); a selection can be run on,
// saved as a target or exported as CSV.
import { api, live } from "../api.js";
import { clear, csvCell, downloadText, fmtAge, fmtTime, h, message, now } from "../dom.js";
import { VTable } from "../vtable.js";
import { applyAgentEvents, attempt, loadAgents } from "./common.js";

const COLUMNS = [
  { key: "id", title: "Agent id", width: "15.5em", text: (a) => a.id },
  { key: "name", title: "Name", width: "minmax(10em,2fr)", text: (a) => a.name },
  { key: "mode", title: "Mode", width: "7em", text: (a) => a.mode, cls: (a) => `mode-${a.mode}` },
  { key: "state", title: "State", width: "9em", text: (a) => a.state },
  { key: "via", title: "Via", width: "8em", text: (a) => a.via || "" },
  { key: "task_server", title: "Task server", width: "8em", text: (a) => a.task_server || "" },
  { key: "profile", title: "Profile", width: "8em", text: (a) => (a.profile ? a.profile.name : "") },
  {
    key: "last_seen",
    title: "Last seen",
    width: "11.5em",
    text: (a) => fmtTime(a.last_seen),
    sort: (a) => a.last_seen || 0,
  },
  {
    key: "inventory",
    title: "Inventory age",
    width: "7em",
    text: (a) => (a.inventory_at === undefined ? "" : fmtAge(a.inventory_at === null ? null : now() - a.inventory_at)),
    sort: (a) => a.inventory_at || 0,
  },
  { key: "platform", title: "Platform", width: "7em", text: (a) => a.platform },
];

export async function endpoints(main, ctx) {
  let agents = new Map();
  let members = null; // ids the filter selects (null: no filter)
  const table = new VTable({
    columns: COLUMNS,
    key: (a) => a.id,
    selectable: true,
    height: Math.max(300, window.innerHeight - 290),
    label: "endpoints",
  });
  const filter = h("input", {
    id: "filter",
    type: "search",
    placeholder: 'e.g. online and platform == "linux" and tags.site == "paris"',
    "aria-label": "filter",
    spellcheck: "false",
  });
  const filterError = h("div", { class: "filter-error" });
  const counts = h("span", { class: "counts", id: "endpoint-counts" });
  const result = h("div", { class: "result" });
  const targetName = h("input", { id: "target-name", placeholder: "target name", "aria-label": "target name" });
  const selected = () => [...table.selected];
  const showCounts = () => {
    counts.textContent = `${table.rows.length} shown of ${agents.size}, ${table.selected.size} selected`;
  };
  table.onSelect = showCounts;
  const draw = () => {
    const rows = [...agents.values()].filter((a) => members === null || members.has(a.id));
    table.setRows(rows);
    showCounts();
  };
  const applyFilter = async () => {
    filterError.replaceChildren();
    const text = filter.value.trim();
    if (!text) {
      members = null;
      draw();
      return;
    }
    try {
      const found = await api("POST", "/selection", { filter: text });
      members = new Set(found.members.map((m) => m.id));
      draw();
    } catch (e) {
      const pos = e.body && Number.isInteger(e.body.position) ? e.body.position : null;
      filterError.append(message("error", e.message));
      if (pos !== null) {
        filterError.append(
          h(
            "pre",
            { class: "caret", "aria-label": "error position" },
            h("span", {}, text.slice(0, pos)),
            h("mark", {}, text.slice(pos, pos + 1) || " "),
            h("span", {}, text.slice(pos + 1)),
          ),
        );
      }
    }
  };
  filter.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") applyFilter();
  });
  const exportCsv = () => {
    const ids = table.selected.size ? table.selected : null;
    const rows = table.rows.filter((a) => ids === null || ids.has(a.id));
    const lines = [COLUMNS.map((c) => c.key).join(",")];
    for (const a of rows) lines.push(COLUMNS.map((c) => csvCell(c.text(a))).join(","));
    downloadText("endpoints.csv", lines.join("\r\n") + "\r\n");
  };
  clear(
    main,
    h("h1", {}, "Endpoints"),
    h(
      "div",
      { class: "toolbar" },
      filter,
      h("button", { onclick: applyFilter }, "Filter"),
      counts,
    ),
    filterError,
    h(
      "div",
      { class: "toolbar" },
      h(
        "button",
        {
          id: "run-selection",
          onclick: () => {
            if (!table.selected.size) {
              clear(result, message("error", "Select agents first."));
              return;
            }
            ctx.state.selection = selected();
            ctx.navigate("run");
          },
        },
        "Run action on selection",
      ),
      targetName,
      h(
        "button",
        {
          onclick: () =>
            attempt(
              result,
              () => {
                const ids = selected();
                if (!ids.length) throw new Error("Select agents first.");
                return api("POST", "/targets", { name: targetName.value.trim(), agents: ids });
              },
              (t) => `Target ${t.name} saved (${t.agents.length} agents).`,
            ),
        },
        "Save selection as target",
      ),
      h("button", { onclick: exportCsv }, "Export CSV"),
    ),
    result,
    table.el,
  );
  const loadInventoryAges = async () => {
    const { stale } = await api("GET", "/inventory/stale?older_than=0");
    const oldest = new Map();
    for (const item of stale) {
      const prev = oldest.get(item.agent);
      const at = item.collected_at;
      if (prev === undefined || at === null || (prev !== null && at < prev)) oldest.set(item.agent, at);
    }
    for (const a of agents.values()) a.inventory_at = oldest.has(a.id) ? oldest.get(a.id) : null;
    table.refresh();
  };
  const view = live(["agents"], {
    load: async () => {
      // drawn as each page of the list arrives: the first rows show before the last load
      agents = await loadAgents((sofar) => {
        agents = sofar;
        draw();
      });
      draw();
      loadInventoryAges().catch(() => {});
    },
    apply: async (events) => {
      const before = agents.size;
      await applyAgentEvents(agents, events);
      if (agents.size !== before) draw();
      else table.refresh();
    },
    onStatus: ctx.onLive,
  });
  ctx.cleanup.push(() => view.stop());
  await view.ready;
}
