// The console's shell: sign-in, navigation, and routing in the browser (the server answers
// every /console/<path> with this app, so deep links work).
import { api, auth, onUnauthorized } from "./api.js";
import { clear, h, message } from "./dom.js";
import { overview } from "./pages/overview.js";
import { endpoints } from "./pages/endpoints.js";
import { run } from "./pages/run.js";
import { jobs, job } from "./pages/jobs.js";
import { inventory } from "./pages/inventory.js";
import { policies } from "./pages/policies.js";
import { targets } from "./pages/targets.js";
import { profiles } from "./pages/profiles.js";
import { nodes } from "./pages/nodes.js";
import { settings } from "./pages/settings.js";
import { audit } from "./pages/audit.js";

const BASE = "/console/";
const NAV = [
  ["", "Overview", overview],
  ["endpoints", "Endpoints", endpoints],
  ["run", "Run", run],
  ["jobs", "Jobs", jobs],
  ["inventory", "Inventory", inventory],
  ["policies", "Policies", policies],
  ["targets", "Targets", targets],
  ["profiles", "Profiles", profiles],
  ["nodes", "Task servers & gateways", nodes],
  ["settings", "Settings", settings],
  ["audit", "Audit", audit],
];

const root = document.getElementById("app");
const state = { who: null, selection: [], current: null, signInMessage: null };

export function navigate(path, replace = false) {
  const url = BASE + path.replace(/^\/+/, "");
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  route();
}

function pathOf() {
  const p = location.pathname.startsWith(BASE) ? location.pathname.slice(BASE.length) : "";
  return p.replace(/\/+$/, "");
}

function signIn(reason) {
  dispose();
  const input = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const error = h("div", { class: "signin-error" });
  if (reason) error.append(message("error", reason));
  const form = h(
    "form",
    {
      class: "signin",
      onsubmit: async (ev) => {
        ev.preventDefault();
        auth.set(input.value.trim());
        try {
          state.who = await api("GET", "/whoami");
        } catch (e) {
          auth.clear();
          clear(error, message("error", `Sign-in refused: ${e.message}`));
          return;
        }
        route();
      },
    },
    h("h1", {}, "tcm console"),
    h("label", { for: "token" }, "API token"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    h(
      "p",
      { class: "hint" },
      "Create one with `tcm apitoken create NAME --role viewer|operator|admin`. ",
      "It is kept in this tab only (sessionStorage) and sent as a header.",
    ),
    error,
  );
  clear(root, h("main", { class: "signin-page" }, form));
  input.focus();
}

onUnauthorized((e) => {
  auth.clear();
  state.who = null;
  signIn(`Signed out: ${e.message}`);
});

function shell(active) {
  const status = h("span", { id: "live", class: "live off", title: "live events" }, "offline");
  const nav = h(
    "nav",
    { "aria-label": "pages" },
    NAV.map(([path, title]) =>
      h(
        "a",
        {
          href: BASE + path,
          class: path === active ? "active" : null,
          "aria-current": path === active ? "page" : null,
          onclick: (ev) => {
            if (ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
            ev.preventDefault();
            navigate(path);
          },
        },
        title,
      ),
    ),
  );
  const who = state.who;
  const header = h(
    "header",
    {},
    h("span", { class: "brand" }, "tcm"),
    nav,
    h(
      "span",
      { class: "who" },
      status,
      h("span", { id: "whoami" }, `${who.name} (${who.role})`),
      h(
        "button",
        {
          class: "link",
          onclick: () => {
            auth.clear();
            state.who = null;
            signIn();
          },
        },
        "Sign out",
      ),
    ),
  );
  const main = h("main", { id: "page" });
  clear(root, header, main);
  return { main, status };
}

function setLive(status, kind, detail) {
  status.className = `live ${kind === "live" ? "on" : "off"}`;
  status.textContent = kind === "live" ? "live" : kind === "error" ? "stream refused" : kind;
  status.title = detail || "";
}

function dispose() {
  if (state.current) for (const stop of state.current.cleanup) stop();
  state.current = null;
}

async function route() {
  if (!auth.token) return signIn();
  if (!state.who) {
    try {
      state.who = await api("GET", "/whoami");
    } catch (e) {
      return signIn(e.status === 401 ? `Sign in again: ${e.message}` : e.message);
    }
  }
  dispose();
  const path = pathOf();
  let match = NAV.find(([p]) => p === path);
  let params = {};
  if (!match && path.startsWith("jobs/")) {
    match = ["jobs", "Job", job];
    params = { job: decodeURIComponent(path.slice(5)) };
  }
  if (!match) match = ["", "Overview", overview];
  const [active, title, page] = match;
  document.title = `${title} · tcm console`;
  const { main, status } = shell(active);
  const ctx = {
    cleanup: [],
    params,
    who: state.who,
    state,
    navigate,
    may: (permission) => state.who.permissions.includes(permission),
    onLive: (kind, detail) => setLive(status, kind, detail),
  };
  state.current = ctx;
  try {
    await page(main, ctx);
  } catch (e) {
    main.append(message("error", e.message));
  }
}

window.addEventListener("popstate", route);
route();
