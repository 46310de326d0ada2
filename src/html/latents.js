// The latent dashboard: summary, firing-frequency histogram, a sortable and
// filterable table (one page of rows at a time), and a card per latent built
// only when it is opened (#latent=N). With --labels: a column of top tokens
// and a search over top rows' labels (#q=...); a label of text marks its
// active token with U+27E6 / U+27E7, drawn highlighted in the cards.
const H = D.freq.length;
const MO = "\u27E6", MC = "\u27E7";
const PAGE = 100;
const state = { key: "freq", desc: true, page: 0, view: [] };

document.getElementById("title").textContent = D.title;
document.getElementById("subtitle").textContent = D.subtitle;
const summary = document.getElementById("summary");
for (const [k, v] of D.summary) summary.appendChild(el("tr", {}, [el("td", { text: k }), el("td", { text: String(v) })]));
barChart(document.getElementById("freqhist"), D.freq_hist.labels, D.freq_hist.counts);

function value(j, key) {
  switch (key) {
    case "id": return j;
    case "dead": return D.freq[j] === 0 ? 1 : 0;
    default: { const v = D[key][j]; return v === null ? -Infinity : v; }
  }
}

// Per latent, its top tokens and the labels of its top rows (markers
// removed), lower-cased: what the search looks in; built on first use.
let haystack = null;
function matches(j, q) {
  if (haystack === null) {
    haystack = new Array(H);
    const strip = (t) => t.split(MO).join("").split(MC).join("");
    for (let i = 0; i < H; i++) {
      const parts = [];
      const t = D.tt ? D.tt[i] : [];
      for (let k = 0; k < t.length; k += 2) parts.push(D.tok[t[k]]);
      const rows = D.top[i];
      for (let k = 0; k < rows.length && k < D.tiles; k++) {
        const l = D.labels[rows[k]];
        if (l !== undefined) parts.push(strip(l));
      }
      haystack[i] = parts.join("\n").toLowerCase();
    }
  }
  return haystack[j].includes(q);
}

function refresh() {
  const q = D.labels ? document.getElementById("q").value.toLowerCase() : "";
  const fmin = parseFloat(document.getElementById("fmin").value);
  const fmax = parseFloat(document.getElementById("fmax").value);
  const amin = parseFloat(document.getElementById("amin").value);
  const dead = document.getElementById("fdead").value;
  const view = [];
  for (let j = 0; j < H; j++) {
    const f = D.freq[j];
    if (!Number.isNaN(fmin) && f < fmin) continue;
    if (!Number.isNaN(fmax) && f > fmax) continue;
    if (!Number.isNaN(amin) && !(D.max[j] >= amin)) continue;
    if (dead === "dead" && f !== 0) continue;
    if (dead === "alive" && f === 0) continue;
    if (q !== "" && !matches(j, q)) continue;
    view.push(j);
  }
  const key = state.key, sign = state.desc ? -1 : 1;
  view.sort((a, b) => sign * (value(a, key) - value(b, key)) || a - b);
  state.view = view;
  state.page = Math.min(state.page, Math.max(0, Math.ceil(view.length / PAGE) - 1));
  for (const th of document.querySelectorAll("#latents th")) {
    th.classList.toggle("sorted", th.dataset.key === key);
    th.classList.toggle("asc", th.dataset.key === key && !state.desc);
  }
  renderRows();
}

function renderRows() {
  const body = document.getElementById("rows");
  const open = openLatent();
  const start = state.page * PAGE;
  const frag = document.createDocumentFragment();
  for (const j of state.view.slice(start, start + PAGE)) {
    const dead = D.freq[j] === 0;
    const cos = D.cos[j] === null ? "\u2013" : fmt(D.cos[j]) + " (" + D.near[j] + ")";
    const tr = el("tr", { cls: "lat" + (dead ? " dead" : "") + (j === open ? " open" : ""), "data-id": j }, [
      el("td", { text: String(j) }), el("td", { text: fmt(D.freq[j]) }), el("td", { text: fmt(D.mean[j]) }),
      el("td", { text: fmt(D.max[j]) }), el("td", { text: fmt(D.norm[j]) }), el("td", { text: cos }),
      el("td", { text: dead ? "dead" : "" }), D.tt ? tokCell(j) : null]);
    frag.appendChild(tr);
  }
  body.replaceChildren(frag);
  document.getElementById("count").textContent = String(state.view.length);
  const pages = Math.max(1, Math.ceil(state.view.length / PAGE));
  document.getElementById("pageinfo").textContent = "page " + (state.page + 1) + " of " + pages;
}

// A latent's top tokens: distinct, most frequent first, with counts.
function tokCell(j) {
  const td = el("td", { cls: "toks" });
  const t = D.tt[j];
  for (let i = 0; i < t.length; i += 2) {
    td.appendChild(el("span", { cls: "tok", text: D.tok[t[i]] }));
    if (t[i + 1] > 1) td.appendChild(el("span", { cls: "n", text: "\u00d7" + t[i + 1] }));
  }
  return td;
}

function openLatent() {
  const m = /(?:^#|&)latent=(\d+)/.exec(location.hash);
  return m ? parseInt(m[1], 10) : -1;
}

function labelOf(r) {
  return D.labels && D.labels[r] !== undefined ? D.labels[r] : null;
}

// A label as text, its marked token (if any) highlighted; never as HTML.
function labelSpan(text) {
  const a = text.indexOf(MO), b = a >= 0 ? text.indexOf(MC, a + 1) : -1;
  if (a < 0 || b < 0) return el("span", { cls: "text", text: text });
  return el("span", { cls: "text" }, [text.slice(0, a), el("mark", { cls: "act", text: text.slice(a + 1, b) }), text.slice(b + 1)]);
}

// Rows in order, those with the same label (among the first `limit`, which
// have their text on the page) once, with all their rows.
function groups(rows, vals, limit) {
  const out = [], at = new Map();
  rows.forEach((r, i) => {
    const t = i < limit ? labelOf(r) : null;
    if (t !== null && at.has(t)) { out[at.get(t)].rows.push(r); return; }
    if (t !== null) at.set(t, out.length);
    out.push({ rows: [r], val: vals[i], text: t });
  });
  return out;
}

// Rows as image tiles (with --image-shape or a square d_in) or as a list of
// labels (duplicates once, with a count), each with its value.
function rowsBlock(rows, vals, limit, attrs) {
  if (D.image && D.pix) {
    const tiles = el("div", Object.assign({ cls: "tiles" }, attrs));
    const [ih, iw] = D.image, scale = Math.max(2, Math.min(8, Math.floor(64 / Math.max(ih, iw))));
    rows.forEach((r, i) => {
      const px = D.pix.rows[r];
      const pic = px !== undefined && i < limit ? greyTile(b64bytes(px), ih, iw, scale) : null;
      const lab = labelOf(r) !== null ? el("span", { cls: "text", text: labelOf(r) }) : null;
      tiles.appendChild(el("div", { cls: "tile", "data-row": r }, [pic, el("span", { text: "row " + r }), lab, el("span", { cls: "val", text: fmt(vals[i]) })]));
    });
    return tiles;
  }
  const ol = el("ol", Object.assign({ cls: "toprows" }, attrs));
  for (const g of groups(rows, vals, limit)) {
    const n = g.rows.length, which = (n === 1 ? "row " : "rows ") + g.rows.join(", ");
    ol.appendChild(el("li", { "data-row": g.rows[0], "data-count": n }, [
      el("span", { cls: "val", text: fmt(g.val) }),
      n > 1 ? el("span", { cls: "dup", title: which, text: "\u00d7" + n }) : null,
      g.text !== null ? labelSpan(g.text) : which,
      g.text !== null ? el("span", { cls: "row", text: which }) : null]));
  }
  return ol;
}

function histCanvas(j) {
  const h = D.hist[j];
  const c = el("canvas", { width: 360, height: 150 });
  if (!h || h.length < 2) return c;
  const first = h[0], counts = h.slice(1);
  const labels = counts.map((_, i) => fmt(D.hist_edges[first + i]));
  barChart(c, labels, counts, "#c2743a");
  return c;
}

// Rows sampled from each third of the latent's max |code| (lower bands
// show what it does below its top activations).
function samplesBlock(c, j) {
  const sr = D.samples[j], sv = D.svals[j], m = D.scale[j];
  c.appendChild(el("h3", { text: "Samples by activation band" }));
  if (!sr || sr.length === 0) { c.appendChild(el("p", { cls: "note", text: "No active rows to sample." })); return; }
  const names = ["lowest third", "middle third", "top third"];
  for (let b = sr.length - 1; b >= 0; b--) {
    const lo = m * b / 3, hi = m * (b + 1) / 3;
    c.appendChild(el("h4", { text: names[b] + ": (" + fmt(lo) + ", " + fmt(hi) + "], " + sr[b].length + " sampled" }));
    if (sr[b].length === 0) c.appendChild(el("p", { cls: "note", text: "No active rows in this band." }));
    c.appendChild(rowsBlock(sr[b], sv[b], D.tiles, { "data-band": b + 1, "data-rows": sr[b].join(",") }));
  }
  c.appendChild(el("p", { cls: "note", text: "Each band's rows are those with the smallest hash of (row, latent): a fixed random sample." }));
}

function card(j) {
  const box = document.getElementById("card");
  if (!(j >= 0 && j < H)) { box.replaceChildren(el("p", { cls: "note", text: "No latent " + j + " (there are " + H + ")." })); return; }
  const rows = D.top[j], vals = D.vals[j], dead = D.freq[j] === 0;
  const c = el("div", { id: "latentcard", "data-latent": j, "data-top-rows": rows.join(",") });
  c.appendChild(el("h2", {}, ["Latent " + j + " ", dead ? el("span", { cls: "dead-flag", text: "dead" }) : null]));
  c.appendChild(el("p", { cls: "stats" }, [
    el("span", { text: "frequency " + fmt(D.freq[j]) }), el("span", { text: "mean " + fmt(D.mean[j]) }),
    el("span", { text: "max " + fmt(D.max[j]) }), el("span", { text: "decoder norm " + fmt(D.norm[j]) }),
    el("span", { text: "nearest " + (D.near[j] < 0 ? "\u2013" : "latent " + D.near[j] + " (cos " + fmt(D.cos[j]) + ")") })]));
  c.appendChild(el("h3", { text: "Top " + rows.length + " rows" + (rows.length < D.top_n ? " (active on only " + rows.length + ")" : "") }));
  if (rows.length === 0) c.appendChild(el("p", { cls: "note", text: "Never active on these data." }));
  c.appendChild(rowsBlock(rows, vals, D.tiles, {}));
  if (D.labels && !D.image && rows.length > 0) c.appendChild(el("p", { cls: "note", text: "The same label on several top rows is shown once (\u00d7 count, value of the first)." }));
  if (D.samples) samplesBlock(c, j);
  c.appendChild(el("h3", { text: "Decoder row" }));
  const dec = D.dec ? D.dec[j] : null;
  if (D.text && !D.image) {
    // Dense activations of text: input dimensions mean nothing.
    const t = el("table", { cls: "kv" });
    t.appendChild(el("tr", {}, [el("td", { text: "decoder norm" }), el("td", { text: fmt(D.norm[j]) })]));
    const near = D.near[j] < 0 ? el("span", { text: "\u2013" })
      : el("span", {}, [el("a", { href: "#latent=" + D.near[j], text: "latent " + D.near[j] }), " (cos " + fmt(D.cos[j]) + ")"]);
    t.appendChild(el("tr", {}, [el("td", { text: "nearest latent" }), el("td", {}, [near])]));
    c.appendChild(t);
  } else if (!dec) c.appendChild(el("p", { cls: "note", text: "Not available (the decoder is not one linear map to the input)." }));
  else if (D.image) {
    const [ih, iw] = D.image, bytes = b64bytes(dec[1]);
    const v = new Float32Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) v[i] = (bytes[i] > 127 ? bytes[i] - 256 : bytes[i]) / 127;
    const scale = Math.max(3, Math.min(12, Math.floor(120 / Math.max(ih, iw))));
    c.appendChild(el("div", { cls: "tile" }, [divergingTile(v, ih, iw, scale), el("span", { text: "red +, blue \u2212; max |w| " + fmt(dec[0]) })]));
  } else {
    const t = el("table", { cls: "kv" });
    for (const [dim, w] of dec) t.appendChild(el("tr", {}, [el("td", { text: "input " + dim }), el("td", { text: fmt(w) })]));
    c.appendChild(el("p", { cls: "note", text: "Largest input dimensions of the decoder row (by |w|):" }));
    c.appendChild(t);
  }
  c.appendChild(el("h3", { text: "Activation histogram (active rows)" }));
  c.appendChild(histCanvas(j));
  c.appendChild(el("p", { cls: "note", text: "|code| in half-octave bins; labels are lower edges." }));
  box.replaceChildren(c);
  for (const tr of document.querySelectorAll("tr.lat")) tr.classList.toggle("open", Number(tr.dataset.id) === j);
}

document.getElementById("rows").addEventListener("click", (ev) => {
  const tr = ev.target.closest("tr.lat");
  if (tr) location.hash = "latent=" + tr.dataset.id;
});
for (const th of document.querySelectorAll("#latents th[data-key]")) th.addEventListener("click", () => {
  if (state.key === th.dataset.key) state.desc = !state.desc; else { state.key = th.dataset.key; state.desc = th.dataset.key !== "id"; }
  refresh();
});
for (const id of ["fmin", "fmax", "amin", "fdead", "q"]) document.getElementById(id).addEventListener("input", () => { state.page = 0; refresh(); });
document.getElementById("goto").addEventListener("change", (ev) => { location.hash = "latent=" + ev.target.value; });
document.getElementById("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderRows(); });
document.getElementById("next").addEventListener("click", () => { state.page = Math.min(Math.ceil(state.view.length / PAGE) - 1, state.page + 1); renderRows(); });
window.addEventListener("hashchange", () => {
  if (queryFromHash()) { state.page = 0; refresh(); }
  const j = openLatent(); if (j >= 0) card(j);
});

// `#q=TEXT` (URL-encoded) sets the search box; true if it did.
function queryFromHash() {
  const q = new URLSearchParams(location.hash.slice(1)).get("q");
  if (q === null || !D.labels) return false;
  document.getElementById("q").value = q;
  return true;
}

if (D.labels) document.getElementById("qlabel").hidden = false;
if (D.tt) document.getElementById("tokhead").hidden = false;
// The address may also set the view: #dead=dead|alive&sort=KEY[-asc]&q=TEXT&latent=N.
(function fromHash() {
  queryFromHash();
  const dead = /dead=(all|alive|dead)/.exec(location.hash);
  if (dead) document.getElementById("fdead").value = dead[1];
  const sort = /sort=(id|freq|mean|max|norm|cos|dead)(-asc)?/.exec(location.hash);
  if (sort) { state.key = sort[1]; state.desc = !sort[2]; }
})();
refresh();
if (openLatent() >= 0) card(openLatent());
document.body.dataset.readyMs = performance.now().toFixed(0);
document.body.dataset.ready = "1";
