// Policies: the list, one policy's document (edit), push now, and each agent's status.
import { api, live } from "../api.js";
import { clear, h, message } from "../dom.js";
import { attempt, section, table } from "./common.js";

export async function policies(main, ctx) {
  const list = h("div");
  const detail = h("div");
  const result = h("div", { class: "result" });
  let open = null;
  const showPolicy = async (name) => {
    open = name;
    const p = await api("GET", `/policies/${encodeURIComponent(name)}`);
    const doc = h("textarea", { id: "policy-document", rows: 10, spellcheck: "false", value: JSON.stringify(p.document, null, 2) });
    const statuses = h("div");
    const agentRows = Object.entries(p.agents || {}).map(([agent, r]) => ({ agent, ...(r || {}) }));
    clear(
      detail,
      section(
        `Policy ${p.name} (${p.type}, version ${p.version})`,
        h("p", {}, `Targets: ${(p.targets || []).join(", ") || "none"}`),
        h("label", { for: "policy-document" }, "Document (JSON)"),
        doc,
        h(
          "div",
          { class: "toolbar" },
          h(
            "button",
            {
              onclick: () =>
                attempt(
                  result,
                  () => api("PUT", `/policies/${encodeURIComponent(name)}`, { document: JSON.parse(doc.value) }),
                  (v) => `Saved: version ${v.version}.`,
                ),
            },
            "Save",
          ),
          h(
            "button",
            {
              id: "push-policy",
              onclick: () =>
                attempt(
                  result,
                  async () => {
                    const r = await api("POST", `/policies/${encodeURIComponent(name)}/push?wait=10`);
                    clear(
                      statuses,
                      table(
                        [
                          ["Agent", (x) => x.agent],
                          ["Status", (x) => x.status],
                          ["Reason", (x) => x.reason || ""],
                        ],
                        Object.entries(r.agents).map(([agent, x]) => ({ agent, ...x })),
                        { empty: "No agents.", label: "push statuses" },
                      ),
                    );
                    return r;
                  },
                  (r) => `Pushed version ${r.version}.`,
                ),
            },
            "Push now",
          ),
        ),
        statuses,
        h("h3", {}, "What each agent reports"),
        table(
          [
            ["Agent", (x) => x.agent],
            ["State", (x) => x.state || "no report"],
            ["Version", (x) => x.version ?? ""],
            ["Error", (x) => x.error || ""],
          ],
          agentRows,
          { empty: "No agents in its targets.", label: "policy agents" },
        ),
      ),
    );
  };
  const load = async () => {
    const { policies: rows, types } = await api("GET", "/policies");
    clear(
      list,
      table(
        [
          ["Policy", (p) => h("button", { class: "link", onclick: () => showPolicy(p.name).catch((e) => clear(result, message("error", e.message))) }, p.name)],
          ["Type", (p) => p.type],
          ["Version", (p) => p.version],
          ["Targets", (p) => (p.targets || []).join(", ")],
        ],
        rows,
        { empty: `No policies. Types: ${types.join(", ")}`, label: "policies" },
      ),
    );
    if (open) await showPolicy(open);
  };
  clear(main, h("h1", {}, "Policies"), result, list, detail);
  let timer = null;
  const view = live(["policies"], {
    load,
    apply: () => {
      if (!timer && open) timer = setTimeout(() => { timer = null; showPolicy(open); }, 1000);
    },
    onStatus: ctx.onLive,
    onError: (e) => clear(result, message("error", e.message)),
  });
  ctx.cleanup.push(() => { view.stop(); clearTimeout(timer); });
  await view.ready;
}
