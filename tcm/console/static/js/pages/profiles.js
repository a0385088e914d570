// Connection profiles, and what an install package for one needs: an enrollment token
// bound to the profile (created here) and the `tcm package build` line that bundles it.
import { api } from "../api.js";
import { clear, downloadText, h, message } from "../dom.js";
import { attempt, section, table } from "./common.js";

export async function profiles(main, ctx) {
  const result = h("div", { class: "result" });
  const list = h("div");
  const { profiles: rows } = await api("GET", "/profiles");
  const origin = location.origin;
  const install = (p) =>
    attempt(
      result,
      async () => {
        const t = await api("POST", "/tokens", { profile: p.name, uses: 100, ttl: 30 * 86400, description: `install package for ${p.name}` });
        const text = [
          `# tcm install package for connection profile ${p.name}`,
          `# enrollment token (100 uses, 30 days): ${t.token}`,
          "# Build the self-contained package (wheels bundled, installs offline):",
          `tcm package build --profile ${p.name} --out tcm-agent-${p.name}.tar.gz --server ${origin}`,
          "# Or enroll one agent by hand:",
          `tcm-agent --server ${origin} --token ${t.token} --state-dir /var/lib/tcm-agent`,
          "",
        ].join("\n");
        downloadText(`tcm-install-${p.name}.txt`, text, "text/plain");
        return t;
      },
      () => "Token created; its install instructions were downloaded.",
    );
  clear(
    list,
    table(
      [
        ["Profile", (p) => p.name],
        ["Version", (p) => p.version],
        ["Settings", (p) => JSON.stringify(p.settings)],
        ["Assignments", (p) => (p.assignments || []).map((a) => `${a.target} (${a.priority})`).join(", ")],
        ["", (p) => h("button", { class: "link", onclick: () => install(p) }, "install package")],
      ],
      rows,
      { empty: "No connection profiles.", label: "profiles" },
    ),
  );
  clear(main, h("h1", {}, "Connection profiles"), result, section("Profiles", list));
}
