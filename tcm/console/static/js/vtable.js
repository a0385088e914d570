// A virtualized table: only the rows in view (and a few more) exist in the DOM, so 10,000
// rows scroll as fast as 30. Cells are set with textContent.
import { h } from "./dom.js";

export class VTable {
  // columns: [{key, title, width, text(row), cls?(row)}]; key(row): the row's id
  constructor({ columns, key, selectable = false, rowHeight = 28, height = 480, onRow, label }) {
    this.columns = columns;
    this.key = key;
    this.selectable = selectable;
    this.rowHeight = rowHeight;
    this.onRow = onRow;
    this.rows = [];
    this.selected = new Set();
    this.onSelect = () => {};
    this.sortKey = null;
    this.sortDir = 1;
    const widths = [selectable ? "2.2em" : null, ...columns.map((c) => c.width || "1fr")];
    this.template = widths.filter(Boolean).join(" ");
    this.all = selectable
      ? h("input", { type: "checkbox", "aria-label": "select all", onchange: () => this.selectAll() })
      : null;
    this.header = h(
      "div",
      { class: "vt-row vt-head", role: "row" },
      selectable ? h("span", { class: "vt-cell" }, this.all) : null,
      columns.map((c) =>
        h(
          "span",
          { class: "vt-cell", role: "columnheader", onclick: () => this.sortBy(c) },
          c.title,
        ),
      ),
    );
    this.header.style.gridTemplateColumns = this.template;
    this.spacer = h("div", { class: "vt-spacer" });
    this.body = h("div", { class: "vt-body", role: "rowgroup" });
    this.viewport = h("div", { class: "vt-viewport" }, this.spacer, this.body);
    this.viewport.style.height = `${height}px`;
    this.viewport.addEventListener("scroll", () => this.schedule());
    this.count = h("span", { class: "vt-count" });
    this.el = h(
      "div",
      { class: "vtable", role: "table", "aria-label": label || "table" },
      this.header,
      this.viewport,
    );
    this.pool = [];
    this.frame = null;
  }

  setRows(rows) {
    this.rows = rows;
    this.applySort();
    const keys = new Set(rows.map(this.key));
    for (const k of [...this.selected]) if (!keys.has(k)) this.selected.delete(k);
    this.spacer.style.height = `${rows.length * this.rowHeight}px`;
    this.render();
  }

  sortBy(column) {
    this.sortDir = this.sortKey === column.key ? -this.sortDir : 1;
    this.sortKey = column.key;
    this.applySort();
    this.render();
  }

  applySort() {
    const column = this.columns.find((c) => c.key === this.sortKey);
    if (!column) return;
    const value = column.sort || column.text;
    const dir = this.sortDir;
    this.rows.sort((a, b) => {
      const x = value(a);
      const y = value(b);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
  }

  schedule() {
    if (this.frame === null) {
      this.frame = requestAnimationFrame(() => {
        this.frame = null;
        this.render();
      });
    }
  }

  refresh() {
    this.schedule();
  }

  render() {
    const rh = this.rowHeight;
    const top = this.viewport.scrollTop;
    const height = this.viewport.clientHeight || 480;
    const first = Math.max(0, Math.floor(top / rh) - 5);
    const last = Math.min(this.rows.length, Math.ceil((top + height) / rh) + 5);
    const needed = last - first;
    while (this.pool.length < needed) this.pool.push(this.makeRow());
    for (let i = 0; i < this.pool.length; i++) {
      const el = this.pool[i];
      const index = first + i;
      if (i >= needed) {
        if (el.parentNode) el.remove();
        continue;
      }
      if (!el.parentNode) this.body.append(el);
      this.fill(el, this.rows[index], index);
    }
    this.body.style.transform = `translateY(${first * rh}px)`;
  }

  makeRow() {
    const cells = this.columns.map(() => h("span", { class: "vt-cell", role: "cell" }));
    const box = this.selectable ? h("input", { type: "checkbox", "aria-label": "select" }) : null;
    const el = h(
      "div",
      { class: "vt-row", role: "row" },
      box ? h("span", { class: "vt-cell" }, box) : null,
      cells,
    );
    el.style.gridTemplateColumns = this.template;
    el.style.height = `${this.rowHeight}px`;
    el.cells = cells;
    el.box = box;
    if (box) {
      box.addEventListener("change", () => {
        if (box.checked) this.selected.add(el.rowKey);
        else this.selected.delete(el.rowKey);
        this.onSelect(this.selected);
      });
    }
    el.addEventListener("click", (ev) => {
      if (ev.target === box || !this.onRow) return;
      this.onRow(el.row);
    });
    return el;
  }

  fill(el, row, index) {
    el.row = row;
    el.rowKey = this.key(row);
    el.dataset.key = el.rowKey;
    el.className = index % 2 ? "vt-row odd" : "vt-row";
    this.columns.forEach((c, i) => {
      const text = c.text(row);
      const cell = el.cells[i];
      const s = text === null || text === undefined ? "" : String(text);
      if (cell.textContent !== s) {
        cell.textContent = s;
        cell.title = s; // the whole value when the column cuts it (an attribute: text)
      }
      cell.className = c.cls ? `vt-cell ${c.cls(row) || ""}` : "vt-cell";
      if (c.title) cell.dataset.col = c.key;
    });
    if (el.box) el.box.checked = this.selected.has(el.rowKey);
  }

  selectAll() {
    if (this.all.checked) for (const r of this.rows) this.selected.add(this.key(r));
    else this.selected.clear();
    this.render();
    this.onSelect(this.selected);
  }
}
