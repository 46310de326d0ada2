// The latent dashboard: summary, firing-frequency histogram, a sortable and
// filterable table (one page of rows at a time), and a card per latent built
// only when it is opened (#latent=N).
const H = D.freq.length;
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

function refresh() {
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
      el("td", { text: dead ? "dead" : "" })]);
    frag.appendChild(tr);
  }
  body.replaceChildren(frag);
  document.getElementById("count").textContent = String(state.view.length);
  const pages = Math.max(1, Math.ceil(state.view.length / PAGE));
  document.getElementById("pageinfo").textContent = "page " + (state.page + 1) + " of " + pages;
}

function openLatent() {
  const m = /latent=(\d+)/.exec(location.hash);
  return m ? parseInt(m[1], 10) : -1;
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
  if (D.image && D.pix) {
    const tiles = el("div", { cls: "tiles" });
    const [ih, iw] = D.image, scale = Math.max(2, Math.min(8, Math.floor(64 / Math.max(ih, iw))));
    rows.forEach((r, i) => {
      const px = D.pix.rows[r];
      const pic = px !== undefined && i < D.tiles ? greyTile(b64bytes(px), ih, iw, scale) : null;
      const lab = D.labels && D.labels[r] !== undefined ? el("span", { cls: "text", text: D.labels[r] }) : null;
      tiles.appendChild(el("div", { cls: "tile", "data-row": r }, [pic, el("span", { text: "row " + r }), lab, el("span", { cls: "val", text: fmt(vals[i]) })]));
    });
    c.appendChild(tiles);
  } else {
    const ol = el("ol", { cls: "toprows" });
    rows.forEach((r, i) => {
      const text = D.labels && D.labels[r] !== undefined ? D.labels[r] : null;
      ol.appendChild(el("li", { "data-row": r }, [el("span", { cls: "val", text: fmt(vals[i]) }), "row " + r + (text !== null ? ": " : ""),
        text !== null ? el("span", { cls: "text", text: text }) : null]));
    });
    c.appendChild(ol);
  }
  c.appendChild(el("h3", { text: "Decoder row" }));
  const dec = D.dec ? D.dec[j] : null;
  if (!dec) c.appendChild(el("p", { cls: "note", text: "Not available (the decoder is not one linear map to the input)." }));
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
for (const th of document.querySelectorAll("#latents th")) th.addEventListener("click", () => {
  if (state.key === th.dataset.key) state.desc = !state.desc; else { state.key = th.dataset.key; state.desc = th.dataset.key !== "id"; }
  refresh();
});
for (const id of ["fmin", "fmax", "amin", "fdead"]) document.getElementById(id).addEventListener("input", () => { state.page = 0; refresh(); });
document.getElementById("goto").addEventListener("change", (ev) => { location.hash = "latent=" + ev.target.value; });
document.getElementById("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderRows(); });
document.getElementById("next").addEventListener("click", () => { state.page = Math.min(Math.ceil(state.view.length / PAGE) - 1, state.page + 1); renderRows(); });
window.addEventListener("hashchange", () => { const j = openLatent(); if (j >= 0) card(j); });

// The address may also set the view: #dead=dead|alive&sort=KEY[-asc]&latent=N.
(function fromHash() {
  const dead = /dead=(all|alive|dead)/.exec(location.hash);
  if (dead) document.getElementById("fdead").value = dead[1];
  const sort = /sort=(id|freq|mean|max|norm|cos|dead)(-asc)?/.exec(location.hash);
  if (sort) { state.key = sort[1]; state.desc = !sort[2]; }
})();
refresh();
if (openLatent() >= 0) card(openLatent());
document.body.dataset.readyMs = performance.now().toFixed(0);
document.body.dataset.ready = "1";
