// The audit log: who changed what, when, and refused requests.
import { api } from "../api.js";
import { clear, fmtTime, h, message } from "../dom.js";
import { table } from "./common.js";

export async function audit(main, ctx) {
  const who = h("input", { id: "audit-who", placeholder: "who", "aria-label": "who" });
  const action = h("input", { id: "audit-action", placeholder: "action or prefix (job.)", "aria-label": "action" });
  const box = h("div");
  const load = async () => {
    const q = new URLSearchParams({ limit: "500" });
    if (who.value) q.set("who", who.value);
    if (action.value) q.set("action", action.value);
    try {
      const { entries } = await api("GET", `/audit?${q}`);
      clear(
        box,
        table(
          [
            ["When", (e) => fmtTime(e.at)],
            ["Who", (e) => e.actor],
            ["Action", (e) => e.action],
            ["Object", (e) => e.object],
            ["Details", (e) => JSON.stringify(e.details)],
          ],
          entries.slice().reverse(),
          { empty: "No entries.", label: "audit" },
        ),
      );
    } catch (e) {
      clear(box, message("error", e.message));
    }
  };
  clear(main, h("h1", {}, "Audit log"), h("div", { class: "toolbar" }, who, action, h("button", { onclick: load }, "Show")), box);
  await load();
}
