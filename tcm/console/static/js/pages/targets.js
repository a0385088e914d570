// Targets: saved filters and selections; create from a filter, delete.
import { api } from "../api.js";
import { clear, fmtTime, h, message } from "../dom.js";
import { attempt, section, table } from "./common.js";

export async function targets(main, ctx) {
  const list = h("div");
  const result = h("div", { class: "result" });
  const name = h("input", { id: "new-target-name", "aria-label": "name", placeholder: "name" });
  const filter = h("input", { id: "new-target-filter", "aria-label": "filter", placeholder: 'filter, e.g. platform == "linux"', spellcheck: "false" });
  const load = async () => {
    const { targets: rows } = await api("GET", "/targets");
    clear(
      list,
      table(
        [
          ["Target", (t) => t.name],
          ["Kind", (t) => t.kind],
          ["Filter / agents", (t) => (t.kind === "filter" ? t.filter : `${(t.agents || []).length} agents`)],
          ["Created", (t) => `${fmtTime(t.created_at)} by ${t.created_by || "?"}`],
          [
            "",
            (t) =>
              h(
                "button",
                {
                  class: "link",
                  onclick: () => attempt(result, async () => { await api("DELETE", `/targets/${encodeURIComponent(t.name)}`); await load(); }, () => `Deleted ${t.name}.`),
                },
                "delete",
              ),
          ],
        ],
        rows,
        { empty: "No targets.", label: "targets" },
      ),
    );
  };
  clear(
    main,
    h("h1", {}, "Targets"),
    section(
      "New target from a filter",
      h(
        "div",
        { class: "toolbar" },
        name,
        filter,
        h(
          "button",
          {
            onclick: () =>
              attempt(
                result,
                async () => {
                  const t = await api("POST", "/targets", { name: name.value.trim(), filter: filter.value });
                  await load();
                  return t;
                },
                (t) => `Target ${t.name} saved.`,
              ),
          },
          "Save",
        ),
      ),
    ),
    result,
    list,
  );
  await load().catch((e) => clear(result, message("error", e.message)));
}
