// Task servers and gateways with their state, agents and links.
import { api } from "../api.js";
import { clear, fmtTime, h } from "../dom.js";
import { section, table } from "./common.js";

export async function nodes(main, ctx) {
  const [ts, gw] = await Promise.all([api("GET", "/taskservers"), api("GET", "/gateways")]);
  const servers = Array.isArray(ts) ? ts : ts.taskservers || [];
  clear(
    main,
    h("h1", {}, "Task servers and gateways"),
    section(
      "Task servers",
      table(
        [
          ["Name", (t) => t.name],
          ["State", (t) => t.state],
          ["Agents", (t) => t.clients ?? t.agents ?? ""],
          ["Max", (t) => t.max_clients ?? ""],
          ["Enrolled", (t) => fmtTime(t.enrolled_at)],
        ],
        servers,
        { empty: "No task servers registered.", label: "task servers" },
      ),
    ),
    section(
      "Gateways",
      table(
        [
          ["Name", (g) => g.name],
          ["State", (g) => g.state],
          ["Links", (g) => (g.links || []).length],
          ["Detail", (g) => JSON.stringify(g.links || [])],
        ],
        gw.gateways || [],
        { empty: "No gateways registered.", label: "gateways" },
      ),
    ),
  );
}
