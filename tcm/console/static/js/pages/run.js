// Run: an action the agents advertise, its arguments from the schema it advertises,
// recipients (the endpoints page's selection, a saved target, or all), a TTL.
import { api } from "../api.js";
import { clear, h, message } from "../dom.js";

function field(name, schema, required) {
  const id = `arg-${name}`;
  const type = schema.type;
  const hint = [];
  let input;
  if (type === "boolean") {
    input = h("input", { id, type: "checkbox", checked: schema.default === true });
  } else if (type === "integer" || type === "number") {
    input = h("input", { id, type: "number", step: type === "integer" ? "1" : "any" });
    if (schema.default !== undefined) input.placeholder = String(schema.default);
  } else if (type === "array" && schema.items && schema.items.type === "string") {
    input = h("textarea", { id, rows: 3, spellcheck: "false" });
    hint.push("one item per line");
  } else if (type === "string") {
    input = h("input", { id, type: "text", spellcheck: "false" });
  } else {
    input = h("textarea", { id, rows: 3, spellcheck: "false" });
    hint.push("JSON");
  }
  const read = () => {
    if (type === "boolean") return input.checked;
    const raw = input.value;
    if (raw.trim() === "") return undefined;
    if (type === "integer" || type === "number") return Number(raw);
    if (type === "array" && schema.items && schema.items.type === "string")
      return raw.split("\n").filter((line) => line !== "");
    if (type === "string") return raw;
    try {
      return JSON.parse(raw);
    } catch (e) {
      throw new Error(`${name}: not JSON (${e.message})`);
    }
  };
  const row = h(
    "div",
    { class: "field" },
    h("label", { for: id }, name, required ? " *" : "", hint.length ? ` (${hint.join(", ")})` : ""),
    input,
    schema.description ? h("small", {}, schema.description) : null,
  );
  return { name, row, read, type };
}

export async function run(main, ctx) {
  const [{ actions }, { targets }] = await Promise.all([
    api("GET", "/actions"),
    api("GET", "/targets"),
  ]);
  const selection = ctx.state.selection || [];
  const action = h(
    "select",
    { id: "action", "aria-label": "action" },
    actions.map((a) => h("option", { value: a.name }, `${a.name} (${a.agents} agents${a.task ? ", task" : ""})`)),
  );
  const argsBox = h("div", { class: "args" });
  let fields = [];
  const showArgs = () => {
    const chosen = actions.find((a) => a.name === action.value);
    const schema = (chosen && chosen.schema) || { properties: {} };
    const required = new Set(schema.required || []);
    fields = Object.entries(schema.properties || {}).map(([name, s]) => field(name, s, required.has(name)));
    clear(argsBox, fields.length ? fields.map((f) => f.row) : h("p", { class: "hint" }, "No arguments."));
  };
  action.addEventListener("change", showArgs);
  const preferred = actions.find((a) => a.name === "command.run");
  if (preferred) action.value = preferred.name;
  showArgs();

  const radio = (value, label, checked) =>
    h("label", { class: "choice" }, h("input", { type: "radio", name: "recipients", value, checked }), ` ${label}`);
  const targetSelect = h(
    "select",
    { id: "target", "aria-label": "saved target" },
    targets.map((t) => h("option", { value: t.name }, t.name)),
  );
  const ttl = h("input", { id: "ttl", type: "number", min: "1", value: "3600" });
  const timeout = h("input", { id: "timeout", type: "number", min: "1", placeholder: "none" });
  const result = h("div", { class: "result", id: "run-result" });
  const cannot = ctx.may("run")
    ? null
    : message("notice", `Your token's role (${ctx.who.role}) may not run jobs: the server will refuse.`);
  const submit = async (ev) => {
    ev.preventDefault();
    result.replaceChildren();
    const body = { action: action.value };
    try {
      const args = {};
      for (const f of fields) {
        const v = f.read();
        if (v !== undefined) args[f.name] = v;
      }
      body.args = args;
    } catch (e) {
      result.append(message("error", e.message));
      return;
    }
    const who = main.querySelector('input[name="recipients"]:checked').value;
    if (who === "selection") body.targets = selection;
    else if (who === "target") body.target = targetSelect.value;
    else body.targets = "all";
    if (ttl.value) body.ttl = Number(ttl.value);
    if (timeout.value) body.timeout = Number(timeout.value);
    try {
      const created = await api("POST", "/jobs", body);
      ctx.navigate(`jobs/${encodeURIComponent(created.job)}`);
    } catch (e) {
      result.append(message("error", `Refused (${e.status}): ${e.message}`));
    }
  };
  clear(
    main,
    h("h1", {}, "Run an action"),
    cannot,
    h(
      "form",
      { class: "run", onsubmit: submit },
      h("div", { class: "field" }, h("label", { for: "action" }, "Action"), action),
      h("fieldset", {}, h("legend", {}, "Arguments"), argsBox),
      h(
        "fieldset",
        {},
        h("legend", {}, "Recipients"),
        selection.length ? radio("selection", `the ${selection.length} selected agents`, true) : null,
        targets.length ? h("div", {}, radio("target", "saved target", false), " ", targetSelect) : null,
        radio("all", "all agents", !selection.length),
      ),
      h("div", { class: "field" }, h("label", { for: "ttl" }, "TTL (seconds)"), ttl),
      h("div", { class: "field" }, h("label", { for: "timeout" }, "Timeout (seconds)"), timeout),
      h("button", { type: "submit", id: "run" }, "Run"),
    ),
    result,
  );
}
