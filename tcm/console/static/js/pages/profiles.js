// Connection profiles, and an install package for one: the server builds it (the wheels of
// tcm and the agent's dependencies, the CA, the profile, a new enrollment token scoped to it,
// install.sh: POST /api/v1/profiles/NAME/package) and the page saves the archive it answers.
import { apiBlob, api } from "../api.js";
import { clear, downloadBlob, h, message } from "../dom.js";
import { section, table } from "./common.js";

const USES = 100; // enrollments the package's token allows (as `tcm package build`)
const TTL = 30 * 86400; // seconds it is valid

// The file name the server gives (Content-Disposition), else the one it would give.
function filename(response, profile) {
  const m = /filename="([^"]+)"/.exec(response.headers.get("content-disposition") || "");
  return m ? m[1] : `tcm-agent-${profile}.tar.gz`;
}

export async function profiles(main) {
  const result = h("div", { class: "result", id: "profiles-result" });
  const list = h("div");
  const { profiles: rows } = await api("GET", "/profiles");
  // The first package of a tcm version waits for the server to build the wheels (seconds
  // to a minute); later ones come from its cache.
  const install = async (p, button) => {
    button.disabled = true;
    result.replaceChildren(message("notice", `Building the install package for ${p.name}…`));
    try {
      let name = `tcm-agent-${p.name}.tar.gz`;
      let token = "";
      const blob = await apiBlob(`/profiles/${encodeURIComponent(p.name)}/package`, {
        method: "POST",
        body: { uses: USES, ttl: TTL },
        onResponse: (r) => {
          name = filename(r, p.name);
          token = r.headers.get("x-tcm-token-id") || "";
        },
      });
      downloadBlob(name, blob);
      result.replaceChildren(
        message(
          "ok",
          `Install package ${name} downloaded (${(blob.size / 1048576).toFixed(1)} MB): ` +
            `./install.sh on the endpoint installs and starts the agent; its enrollment ` +
            `token ${token} allows ${USES} enrollments for 30 days.`,
        ),
      );
    } catch (e) {
      const why = e.status ? `${e.status === 403 ? "Refused" : "Not built"} (${e.status}): ` : "";
      result.replaceChildren(message("error", why + e.message));
    } finally {
      button.disabled = false;
    }
  };
  const button = (p) => {
    const b = h("button", { class: "link" }, "install package");
    b.addEventListener("click", () => install(p, b));
    return b;
  };
  clear(
    list,
    table(
      [
        ["Profile", (p) => p.name],
        ["Version", (p) => p.version],
        ["Settings", (p) => JSON.stringify(p.settings)],
        ["Assignments", (p) => (p.assignments || []).map((a) => `${a.target} (${a.priority})`).join(", ")],
        ["", button],
      ],
      rows,
      { empty: "No connection profiles.", label: "profiles" },
    ),
  );
  clear(main, h("h1", {}, "Connection profiles"), result, section("Profiles", list));
}
