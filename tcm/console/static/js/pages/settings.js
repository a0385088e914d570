// Settings (persistent connections, approval) and the approval queue.
import { api, live } from "../api.js";
import { clear, fmtTime, h, message } from "../dom.js";
import { attempt, section, table } from "./common.js";

export async function settings(main, ctx) {
  const result = h("div", { class: "result" });
  const form = h("div");
  const queue = h("div");
  const load = async () => {
    const [s, { agents }] = await Promise.all([api("GET", "/settings"), api("GET", "/agents?state=pending")]);
    const toggle = (key, label) =>
      h(
        "label",
        { class: "choice" },
        h("input", {
          type: "checkbox",
          id: `setting-${key}`,
          checked: Boolean(s[key]),
          onchange: (ev) =>
            attempt(result, () => api("PUT", "/settings", { [key]: ev.target.checked }), () => `${label}: ${ev.target.checked ? "on" : "off"}.`).then((r) => {
              if (r === undefined) ev.target.checked = !ev.target.checked;
            }),
        }),
        ` ${label}`,
      );
    clear(
      form,
      toggle("persistent_connections", "Persistent connections"),
      toggle("require_approval", "Require approval of new agents"),
      table(
        [
          ["Setting", ([k]) => k],
          ["Value", ([, v]) => JSON.stringify(v)],
        ],
        Object.entries(s),
        { label: "settings" },
      ),
    );
    clear(
      queue,
      table(
        [
          ["Agent id", (a) => a.id],
          ["Hostname", (a) => a.hostname],
          ["Platform", (a) => a.platform],
          ["Enrolled", (a) => fmtTime(a.enrolled_at)],
          [
            "",
            (a) =>
              h(
                "button",
                {
                  class: "link",
                  onclick: () => attempt(result, async () => { await api("POST", `/agents/${encodeURIComponent(a.id)}/approve`, {}); await load(); }, () => `Approved ${a.id}.`),
                },
                "approve",
              ),
          ],
        ],
        agents,
        { empty: "No agent awaits approval.", label: "approval queue" },
      ),
    );
  };
  clear(main, h("h1", {}, "Settings"), result, section("Runtime settings", form), section("Approval queue", queue));
  const view = live(["agents"], {
    load,
    apply: (events) => {
      if (events.some((e) => e.new || e.approved || e.revoked)) load();
    },
    onStatus: ctx.onLive,
    onError: (e) => clear(result, message("error", e.message)),
  });
  ctx.cleanup.push(() => view.stop());
  await view.ready;
}
