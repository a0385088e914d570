// Inventory freshness per data class; "refresh stale" collects just what is stale.
import { api } from "../api.js";
import { clear, fmtTime, h, message } from "../dom.js";
import { attempt, section, table } from "./common.js";

export async function inventory(main, ctx) {
  const olderThan = h("input", { id: "older-than", type: "number", min: "0", value: "3600" });
  const summary = h("div");
  const detail = h("div");
  const result = h("div", { class: "result" });
  const load = async () => {
    const seconds = Number(olderThan.value || 3600);
    const [{ stale }, { agents }] = await Promise.all([
      api("GET", `/inventory/stale?older_than=${seconds}`),
      api("GET", "/agents"),
    ]);
    const byClass = new Map();
    for (const item of stale) {
      const c = byClass.get(item.class) || { cls: item.class, stale: 0, never: 0 };
      if (item.collected_at === null) c.never += 1;
      else c.stale += 1;
      byClass.set(item.class, c);
    }
    clear(
      summary,
      h("p", {}, `${agents.length} agents; ${stale.length} (agent, class) pairs older than ${seconds} s or never collected.`),
      table(
        [
          ["Class", (c) => c.cls],
          ["Stale agents", (c) => c.stale],
          ["Never collected", (c) => c.never],
          ["Fresh agents", (c) => agents.length - c.stale - c.never],
        ],
        [...byClass.values()],
        { empty: "Every class is fresh on every agent.", label: "freshness" },
      ),
    );
    clear(
      detail,
      table(
        [
          ["Agent", (i) => i.agent],
          ["Class", (i) => i.class],
          ["Collected", (i) => (i.collected_at === null ? "never" : fmtTime(i.collected_at))],
        ],
        stale.slice(0, 500),
        { empty: "Nothing stale.", label: "stale items" },
      ),
    );
  };
  clear(
    main,
    h("h1", {}, "Inventory freshness"),
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "older-than" }, "Stale when older than (seconds)"),
      olderThan,
      h("button", { onclick: () => load().catch((e) => clear(result, message("error", e.message))) }, "Show"),
      h(
        "button",
        {
          id: "refresh-stale",
          onclick: () =>
            attempt(
              result,
              () => api("POST", "/inventory/refresh", { older_than: Number(olderThan.value || 3600) }),
              (r) => (r.jobs.length ? `${r.jobs.length} refresh job(s) created: ${r.jobs.map((j) => j.job).join(", ")}` : "Nothing stale: no job created."),
            ),
        },
        "Refresh stale",
      ),
    ),
    result,
    section("Per class", summary),
    section("Stale (first 500)", detail),
  );
  await load();
}
