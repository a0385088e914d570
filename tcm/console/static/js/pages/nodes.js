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
          ["URL", (t) => t.url || ""],
          ["Sessions", (t) => t.clients],
          ["Via gateways", (t) => t.via_gateways],
          ["Assigned", (t) => t.assigned],
          ["Max", (t) => t.max_clients],
          ["Since", (t) => `${fmtTime(t.since)} ${t.reason || ""}`],
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
          ["URL", (g) => g.url || ""],
          ["Sessions", (g) => g.sessions],
          ["Task sessions", (g) => g.task_sessions],
          ["Task servers", (g) => (g.task_servers || []).join(", ")],
          ["Worker links", (g) => (g.links || []).map((l) => `#${l.worker ?? 0}: ${l.sessions} sessions, ${l.pushes} pushes`).join("; ")],
          ["Enrolled", (g) => fmtTime(g.enrolled_at)],
        ],
        gw.gateways || [],
        { empty: "No gateways registered.", label: "gateways" },
      ),
    ),
  );
}
