// atlasq's zoomable atlas map (see atlasq/streamlit/map_component.py for what Python sends).
//
// Plain canvas drawing, written by hand: the map draws one level's icons per frame, cropped and
// marked per cell depending on the zoom, which a chart library would not do without a rerun.
// Coordinates: "unit" space is the atlas square [0, 1]², x to the right, y downwards; cell
// (i, j) of a G×G level spans x in [j/G, (j+1)/G], y in [i/G, (i+1)/G]. At zoom 1 the square fits
// the canvas; the canvas centre shows unit point (cx, cy).

const SEQUENTIAL = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
const SELECT = "#ff0050";
const BADGE_PX = 44;  // icons at least this wide carry their count as a number (12 px)
const VIEW_REST_MS = 400;  // the view is reported this long after the last zoom or pan

function ramp(anchors, t) {
  t = Math.min(Math.max(t, 0), 1) * (anchors.length - 1);
  const low = Math.min(Math.floor(t), anchors.length - 2), f = t - low;
  return anchors[low].map((c, k) => Math.round(c * (1 - f) + anchors[low + 1][k] * f));
}
const rgb = (c, a = 1) => `rgba(${c[0]},${c[1]},${c[2]},${a})`;
const ink = (c) => (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 ? "#111" : "#fff");

function compact(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(n >= 1e4 ? 0 : 1) + "k";
  return String(n);
}
const cellKey = (level, i, j) => `${level},${i},${j}`;

// The colour scale of one level's overlay, as atlasq.heatmap.scale computes it: log10(1 + v) on a
// log scale starting at the smallest value shown; symmetric around 0 when diverging.
function makeScale(cells) {
  const o = cells.overlay;
  const shown = cells.value.map((v) => (v === null ? null : o.log ? Math.log10(1 + Math.max(v, 0)) : v));
  const finite = shown.filter((v) => v !== null);
  let high = finite.length ? Math.max(...finite.map(Math.abs)) : 1;
  if (!(high > 0)) high = 1;
  let low = 0;
  if (o.diverging) low = -high;
  else if (o.log && finite.length && Math.min(...finite) < high) low = Math.min(...finite);
  const t = shown.map((v) => (v === null ? null : (v - low) / (high - low)));
  const unshow = (s) => (o.log ? Math.pow(10, s) - 1 : s);
  return { low, high, t, unshow };
}

class AtlasMap {
  constructor(parent) {
    this.root = document.createElement("div");
    this.root.className = "aq-map";
    this.root.tabIndex = 0;
    this.root.setAttribute("role", "application");
    this.root.setAttribute("aria-label", "atlas map: wheel or +/- to zoom, drag or arrows to pan, 0 to reset, " +
                          "click or Enter (the centre cell) to select, shift to add, shift-drag for a box, " +
                          "Escape to clear");
    this.root.innerHTML = `
      <div class="aq-stage"><canvas class="aq-canvas"></canvas>
        <div class="aq-tools">
          <button class="aq-in" title="zoom in (+)">+</button><button class="aq-out" title="zoom out (−)">−</button>
          <button class="aq-reset" title="whole atlas (0)">⟲</button>
          <button class="aq-full" title="fullscreen">⤢</button>
        </div>
        <div class="aq-tip" hidden></div><div class="aq-box" hidden></div></div>
      <div class="aq-legend"><span class="aq-title"></span><canvas class="aq-ramp" width="160" height="12"></canvas>
        <span class="aq-ticks"></span><span class="aq-zero"></span>
        <label class="aq-heat" hidden><input type="checkbox" class="aq-heat-on" checked> heat layer
          <input type="range" class="aq-heat-opacity" min="0" max="1" step="0.05"
                 aria-label="heat layer opacity"></label>
        <span class="aq-status"></span></div>`;
    parent.appendChild(this.root);
    const q = (s) => this.root.querySelector(s);
    [this.stage, this.canvas, this.tip, this.box] = [q(".aq-stage"), q(".aq-canvas"), q(".aq-tip"), q(".aq-box")];
    this.ctx = this.canvas.getContext("2d");
    this.legend = { title: q(".aq-title"), ramp: q(".aq-ramp"), ticks: q(".aq-ticks"), zero: q(".aq-zero"),
                    status: q(".aq-status"), heat: q(".aq-heat"), heatOn: q(".aq-heat-on"),
                    heatOpacity: q(".aq-heat-opacity") };
    this.heat = { on: true, opacity: 0.5, given: null };
    this.view = { zoom: 1, cx: 0.5, cy: 0.5 };
    this.selected = new Map();  // key -> [level, i, j]
    this.clicked = null;
    this.levels = [];           // {size, tile, image, cells, rowOf, scale}
    this.pointers = new Map();
    this.seq = Date.now() % 1e9;
    this.lastGiven = undefined;
    this.lastSent = null;
    this.recent = [];           // the views of the latest states sent (Python echoes them back)
    this.viewTimer = null;
    this.pending = null;        // a view to apply once the canvas has a size
    this.bind(q);
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.stage);
  }

  destroy() {
    clearTimeout(this.viewTimer);
    this.resizer.disconnect();
    this.root.remove();
  }

  // ----------------------------------------------------------------- data from Python
  update(data, setStateValue) {
    this.setStateValue = setStateValue;
    this.data = data;
    this.root.style.setProperty("--aq-height", `${data.height}px`);
    if (data.heat_opacity !== this.heat.given) {  // the page's setting, until the slider moves it
      this.heat = { on: true, opacity: data.heat_opacity, given: data.heat_opacity };
      this.legend.heatOn.checked = true;
      this.legend.heatOpacity.value = data.heat_opacity;
    }
    const old = new Map(this.levels.map((l) => [l.size, l]));
    this.levels = data.levels.map((spec) => {
      const level = old.get(spec.size) || { size: spec.size };
      if (level.mosaicUrl !== spec.mosaic) {  // fetched when first needed (see need())
        level.mosaicUrl = spec.mosaic;
        level.image = null;
        level.requested = null;
        level.tile = spec.tile;
      }
      if (level.cellsUrl !== spec.cells) {
        level.cellsUrl = spec.cells;
        fetch(spec.cells).then((r) => r.json()).then((cells) => {
          if (level.cellsUrl !== spec.cells) return;
          level.cells = cells;
          level.rowOf = new Int32Array(spec.size * spec.size).fill(-1);
          cells.i.forEach((i, r) => { level.rowOf[i * spec.size + cells.j[r]] = r; });
          level.scale = cells.overlay ? makeScale(cells) : null;
          this.draw();
          this.drawLegend();
        });
      }
      return level;
    });
    const given = JSON.stringify(data.state);
    if (given !== this.lastGiven) {
      this.lastGiven = given;
      // the state Python hands back is often the one this map sent: do not jump back to it
      if (data.state && !this.sameAsSent(data.state)) this.pending = data.state;
    }
    this.drawLegend();
    this.resize();
  }

  // What Python gives back is often a state this map sent a moment ago, while the user has
  // zoomed or panned on since: that echo must not move the map back. (The app gives no click
  // back, so only the view and the selection are compared.)
  static viewOf(state) {
    return JSON.stringify([state.level, state.zoom, state.center, state.selected]);
  }
  sameAsSent(state) {
    return this.recent.includes(AtlasMap.viewOf(state));
  }

  apply(state) {
    const base = this.base();
    this.view.zoom = this.clampZoom(state.zoom || 1);
    if (state.level && this.levelFor(this.view.zoom) !== state.level) {
      const sizes = this.sizes();
      this.view.zoom = state.level === sizes[0] ? 1 : this.clampZoom(this.data.min_icon_px * state.level / base);
    }
    [this.view.cx, this.view.cy] = state.center || [0.5, 0.5];
    this.selected = new Map((state.selected || []).map((c) => [cellKey(...c), c]));
    this.clicked = state.clicked || null;
    this.clampCentre();
  }

  // kind "select": a click, a box or Escape changed the selection; "view": only the zoom or the
  // centre changed (sent once the view has rested, so a link to the page keeps it)
  send(kind = "select") {
    clearTimeout(this.viewTimer);  // this state carries the view too
    this.viewTimer = null;
    const state = { level: this.levelFor(this.view.zoom), zoom: +this.view.zoom.toFixed(4),
                    center: [+this.view.cx.toFixed(5), +this.view.cy.toFixed(5)],
                    selected: [...this.selected.values()], clicked: this.clicked, kind, seq: ++this.seq };
    this.lastSent = state;
    this.recent = [...this.recent.slice(-15), AtlasMap.viewOf(state)];
    this.root.dataset.sent = JSON.stringify(state);
    if (this.setStateValue) this.setStateValue("view", state);
  }

  // called on every zoom or pan by the user: the view is sent VIEW_REST_MS after the last one
  // (and after the pointer is released), and only when it differs from the last one sent
  moved() {
    if (!this.data || this.data.report_view === false) return;
    clearTimeout(this.viewTimer);
    this.viewTimer = setTimeout(() => {
      this.viewTimer = null;
      if (this.pointers.size) { this.moved(); return; }  // still dragging or pinching
      const s = this.lastSent, level = this.levelFor(this.view.zoom);
      if (s && s.level === level && s.zoom === +this.view.zoom.toFixed(4) &&
          s.center[0] === +this.view.cx.toFixed(5) && s.center[1] === +this.view.cy.toFixed(5)) return;
      this.send("view");
    }, VIEW_REST_MS);
  }

  // ----------------------------------------------------------------- geometry
  sizes() { return this.levels.map((l) => l.size).sort((a, b) => a - b); }
  base() { return Math.max(1, Math.min(this.width, this.height)); }
  scale() { return this.base() * this.view.zoom; }
  levelFor(zoom) {
    const s = this.base() * zoom, sizes = this.sizes();
    let chosen = sizes[0];
    for (const g of sizes) if (s / g >= this.data.min_icon_px) chosen = g;
    return chosen;
  }
  clampZoom(z) {
    const finest = this.sizes().slice(-1)[0] || 1;
    return Math.min(Math.max(z, 1), Math.max(4, finest * 256 / this.base()));
  }
  clampCentre() {
    this.view.cx = Math.min(Math.max(this.view.cx, 0), 1);
    this.view.cy = Math.min(Math.max(this.view.cy, 0), 1);
  }
  toUnit(px, py) {
    const s = this.scale();
    return [this.view.cx + (px - this.width / 2) / s, this.view.cy + (py - this.height / 2) / s];
  }
  toScreen(ux, uy) {
    const s = this.scale();
    return [this.width / 2 + (ux - this.view.cx) * s, this.height / 2 + (uy - this.view.cy) * s];
  }
  local(event) {
    const r = this.canvas.getBoundingClientRect();
    return [event.clientX - r.left, event.clientY - r.top];
  }
  zoomAt(factor, px, py) {
    const [ux, uy] = this.toUnit(px, py);
    this.view.zoom = this.clampZoom(this.view.zoom * factor);
    const s = this.scale();
    this.view.cx = ux - (px - this.width / 2) / s;
    this.view.cy = uy - (py - this.height / 2) / s;
    this.clampCentre();
    this.draw();
    this.moved();
  }
  // A level's mosaic (megabytes at 80×80) is fetched only once the zoom asks for that level or
  // the next coarser one, so a view that stays zoomed out never downloads the fine levels.
  need(size) {
    const sizes = this.sizes(), k = sizes.indexOf(size);
    for (const level of this.levels) {
      const n = sizes.indexOf(level.size);
      if (n > k + 1 || level.requested === level.mosaicUrl) continue;
      const url = level.mosaicUrl, image = new Image();
      level.requested = url;
      image.onload = () => { if (level.mosaicUrl === url) { level.image = image; this.draw(); } };
      image.src = url;
    }
  }

  // the level drawn now: the one the zoom asks for once its mosaic and cells are in, else the
  // nearest coarser one that is (then the finer one replaces it when it arrives)
  drawnLevel() {
    const want = this.levelFor(this.view.zoom);
    this.need(want);
    const ready = this.levels.filter((l) => l.image && l.cells).sort((a, b) => a.size - b.size);
    return ready.filter((l) => l.size <= want).pop() || ready[0] || null;
  }
  cellAt(px, py, level = this.drawnLevel()) {
    if (!level) return null;
    const [ux, uy] = this.toUnit(px, py), g = level.size;
    const i = Math.floor(uy * g), j = Math.floor(ux * g);
    if (i < 0 || j < 0 || i >= g || j >= g) return null;
    const row = level.rowOf[i * g + j];
    return row < 0 ? null : { level, row, i, j };
  }

  // ----------------------------------------------------------------- drawing
  resize() {
    const r = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    if (r.width > 0 && (r.width !== this.width || r.height !== this.height || dpr !== this.dpr)) {
      [this.width, this.height, this.dpr] = [r.width, r.height, dpr];
      this.canvas.width = Math.round(r.width * dpr);
      this.canvas.height = Math.round(r.height * dpr);
    }
    if (this.width > 0 && this.pending && this.levels.length) {
      this.apply(this.pending);
      this.pending = null;
    }
    this.draw();
  }

  draw() {
    this.publish();
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = null; this.paint(); });
  }

  // the view on the element, at once (tests and page scripts read it; the frame comes later)
  publish() {
    if (!this.width || !this.data) return;
    const level = this.drawnLevel();
    this.root.dataset.level = level ? level.size : "";
    this.root.dataset.wanted = this.levelFor(this.view.zoom);
    this.root.dataset.zoom = this.view.zoom.toFixed(4);
    this.root.dataset.center = `${this.view.cx.toFixed(5)},${this.view.cy.toFixed(5)}`;
  }

  paint() {
    const ctx = this.ctx, w = this.width, h = this.height;
    if (!w || !this.data) return;
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, w, h);
    const level = this.drawnLevel();
    const want = this.levelFor(this.view.zoom);
    this.publish();
    if (!level) { this.status("loading the atlas…"); return; }
    if (level !== this.legendLevel) { this.legendLevel = level; this.drawLegend(); }
    const g = level.size, c = this.scale() / g;
    const [x0, y0] = this.toScreen(0, 0), [x1, y1] = this.toScreen(1, 1);
    ctx.strokeStyle = "#ddd";
    ctx.strokeRect(x0 - 0.5, y0 - 0.5, x1 - x0 + 1, y1 - y0 + 1);
    const [ua, va] = this.toUnit(0, 0), [ub, vb] = this.toUnit(w, h);
    const j0 = Math.max(0, Math.floor(ua * g)), j1 = Math.min(g - 1, Math.floor(ub * g));
    const i0 = Math.max(0, Math.floor(va * g)), i1 = Math.min(g - 1, Math.floor(vb * g));
    const cells = level.cells, o = cells.overlay;
    let style = o ? this.data.overlay_style : "off";
    if (o && o.opacity_only && style !== "off") style = "fade";
    const t = level.tile, crop = Math.max(0, Math.round(t * Math.min(0.04, 2 / Math.max(c, 1)) * 4) / 4);
    const gap = c > 24 ? 1 : 0;
    const labelled = [];
    for (let i = i0; i <= i1; i++) {
      for (let j = j0; j <= j1; j++) {
        const row = level.rowOf[i * g + j];
        if (row < 0) continue;
        const x = x0 + j * c, y = y0 + i * c;
        const n = cells.n[row], tv = level.scale ? level.scale.t[row] : null;
        const zero = o && !o.diverging && !o.opacity_only && n === 0 && style !== "off";
        ctx.save();
        if (zero) { ctx.filter = "grayscale(1)"; ctx.globalAlpha = 0.28; }
        else if (style === "fade") ctx.globalAlpha = 0.12 + 0.88 * (tv === null ? 0 : tv);
        ctx.drawImage(level.image, j * t + crop, i * t + crop, t - 2 * crop, t - 2 * crop,
                      x + gap, y + gap, c - 2 * gap, c - 2 * gap);
        ctx.restore();
        if (style === "heat" && this.heat.on && tv !== null && !zero) {
          ctx.fillStyle = rgb(ramp(o.diverging ? DIVERGING : SEQUENTIAL, tv), this.heat.opacity);
          ctx.fillRect(x + gap, y + gap, c - 2 * gap, c - 2 * gap);
        }
        labelled.push([row, x, y, zero, tv]);
      }
    }
    // marks over the icons, after all icons, so no neighbour's icon covers them
    for (const [row, x, y, zero, tv] of labelled) {
      if (zero) this.zeroMark(x, y, c);
      else if (style === "badge" && tv !== null) this.badge(level, row, x, y, c, tv);
      if (c >= 56) this.labels(level, row, x, y, c);
    }
    for (const [, [lv, i, j]] of this.selected) this.outline(lv, i, j, SELECT, 3);
    if (this.hover && this.hover.level === level) this.outline(g, this.hover.i, this.hover.j, "#fff", 1.5);
    this.status(`${g}×${g}` + (want !== g ? ` (loading ${want}×${want})` : "") +
                ` · icons ${Math.round(c)} px · zoom ${this.view.zoom.toFixed(1)}×` +
                (this.selected.size ? ` · ${this.selected.size} selected` : ""));
  }

  outline(lv, i, j, colour, width) {
    const [ax, ay] = this.toScreen(j / lv, i / lv), [bx, by] = this.toScreen((j + 1) / lv, (i + 1) / lv);
    const ctx = this.ctx;
    ctx.lineWidth = width + 2;
    ctx.strokeStyle = "rgba(255,255,255,0.9)";
    ctx.strokeRect(ax + width / 2, ay + width / 2, bx - ax - width, by - ay - width);
    ctx.lineWidth = width;
    ctx.strokeStyle = colour;
    ctx.strokeRect(ax + width / 2, ay + width / 2, bx - ax - width, by - ay - width);
  }

  pill(text, x, y, background, colour, size, align = "left") {
    const ctx = this.ctx;
    ctx.font = `600 ${size}px system-ui, sans-serif`;
    const w = ctx.measureText(text).width + 8, hgt = size + 5;
    const left = align === "right" ? x - w : x;
    ctx.fillStyle = background;
    ctx.beginPath();
    ctx.roundRect(left, y, w, hgt, 4);
    ctx.fill();
    ctx.fillStyle = colour;
    ctx.textBaseline = "middle";
    ctx.fillText(text, left + 4, y + hgt / 2 + 0.5);
    return w;
  }

  zeroMark(x, y, c) {
    if (c >= BADGE_PX) this.pill("0", x + c - 3, y + c - 20, "rgba(110,110,110,0.9)", "#fff", 12, "right");
  }

  badge(level, row, x, y, c, tv) {
    const o = level.cells.overlay, ctx = this.ctx;
    const colour = ramp(o.diverging ? DIVERGING : SEQUENTIAL, tv);
    let bar = 0;
    if (!o.diverging) {  // a bar along the bottom: its length is the count on the legend's scale
      bar = Math.max(3, Math.min(6, c / 12));
      ctx.fillStyle = "rgba(255,255,255,0.85)";
      ctx.fillRect(x + 1, y + c - bar - 1, c - 2, bar);
      ctx.fillStyle = rgb(colour);
      ctx.fillRect(x + 1, y + c - bar - 1, Math.max(2, (c - 2) * tv), bar);
    }
    if (c < BADGE_PX) return;  // smaller icons keep only the bar: a number would hide them
    const v = level.cells.value[row], size = 12;
    const text = o.diverging ? `${v > 0 ? "▲" : "▼"}×${Math.pow(2, Math.abs(v)).toFixed(1)}`
                             : compact(level.cells.n[row]);
    // bottom right, above the bar: the top left holds the cell's coordinates and label
    this.pill(text, x + c - 3, y + c - bar - size - 8, rgb(colour, 0.92), ink(colour), size, "right");
  }

  labels(level, row, x, y, c) {
    const cells = level.cells;
    this.pill(`${cells.i[row]},${cells.j[row]}`, x + 3, y + 3, "rgba(255,255,255,0.85)", "#222", 12);
    const top = cells.top[row][0];
    if (c >= 96 && top) {
      const ctx = this.ctx;
      ctx.font = "600 12px system-ui, sans-serif";
      let label = top[0];
      while (label.length > 3 && ctx.measureText(label).width > c - 16) label = label.slice(0, -2) + "…";
      this.pill(label, x + 3, y + 23, "rgba(255,255,255,0.88)", "#222", 12);
    }
  }

  status(text) { this.legend.status.textContent = text; }

  drawLegend() {
    // the legend of the level drawn: each level's counts have their own range
    const drawn = this.legendLevel && this.levels.includes(this.legendLevel) ? this.legendLevel : null;
    const level = drawn && drawn.cells ? drawn : this.levels.find((l) => l.cells && l.cells.overlay);
    const L = this.legend;
    if (!level || !level.cells.overlay || this.data.overlay_style === "off") {
      L.heat.hidden = true;
      L.title.textContent = "";
      L.ramp.hidden = true;
      L.ticks.textContent = "";
      L.zero.textContent = "";
      return;
    }
    const o = level.cells.overlay, sc = level.scale;
    L.heat.hidden = this.data.overlay_style !== "heat" || o.opacity_only;
    const fade = o.opacity_only || this.data.overlay_style === "fade";
    L.title.textContent = o.legend + (o.log && !o.diverging ? " (log scale)" : "");
    L.ramp.hidden = false;
    const ctx = L.ramp.getContext("2d");
    for (let x = 0; x < 160; x++) {
      ctx.fillStyle = fade ? `rgba(40,40,40,${0.12 + 0.88 * x / 159})`
                           : rgb(ramp(o.diverging ? DIVERGING : SEQUENTIAL, x / 159));
      ctx.fillRect(x, 0, 1, 12);
    }
    const counts = !o.diverging && !o.opacity_only;
    const fmt = (v) => (counts || Math.abs(v) >= 100 ? compact(Math.round(v)) : Math.abs(v) >= 10 ? v.toFixed(0)
                        : v.toFixed(Math.abs(v) >= 1 ? 1 : 2));
    if (o.diverging) L.ticks.textContent = `${fmt(sc.low)} … 0 … +${fmt(sc.high)}`;
    else {
      const [low, mid, high] = [sc.low, (sc.low + sc.high) / 2, sc.high].map((v) => fmt(sc.unshow(v)));
      L.ticks.textContent = `${low} … ${mid} … ${high}`;
    }
    L.zero.textContent = o.diverging ? "no mark: not significant" : fade ? "" : "grey with 0: none of this dataset";
  }

  // ----------------------------------------------------------------- tooltip
  showTip(px, py) {
    const hit = this.cellAt(px, py);
    const before = this.hover;
    this.hover = hit;
    if (!before || !hit || before.row !== hit.row || before.level !== hit.level) this.draw();
    if (!hit) { this.tip.hidden = true; return; }
    const cells = hit.level.cells, o = cells.overlay, r = hit.row;
    const lines = [`<b>cell ${hit.i},${hit.j}</b> <span class="aq-dim">(${hit.level.size}×${hit.level.size})</span>`];
    if (o) {
      const n = cells.n[r];
      lines.push(`activations: <b>${n.toLocaleString()}</b>`);
      if (cells.images[r] !== null) lines.push(`distinct images: <b>${cells.images[r].toLocaleString()}</b>`);
      const share = o.total ? n / o.total : null;
      if (share !== null) lines.push(`share of the dataset: <b>${(100 * share).toFixed(n && share < 0.001 ? 3 : 1)}%</b>`);
      const v = cells.value[r];
      if (o.diverging) lines.push(v === null ? "no significant difference" :
        `log2 share ratio <b>${v > 0 ? "+" : ""}${v.toFixed(2)}</b> ` +
        `(${Math.pow(2, Math.abs(v)).toFixed(1)}× ${v > 0 ? "more" : "less"})`);
      else if (o.opacity_only) lines.push(`${escapeHtml(o.legend)}: <b>${v === null ? "–" : v.toFixed(3)}</b>`);
    }
    lines.push(`reference activations: ${cells.ref[r].toLocaleString()}`);
    const top = cells.top[r];
    if (top.length) {
      lines.push(`top classes <span class="aq-dim">(mean attribution h·∂logit/∂h, logit units)</span>:`);
      for (const [label, score] of top) lines.push(`&nbsp;&nbsp;${escapeHtml(label)} <b>${score.toFixed(2)}</b>`);
    } else lines.push(`<span class="aq-dim">no class with positive attribution</span>`);
    this.tip.innerHTML = lines.join("<br>");
    this.tip.hidden = false;
    const tw = this.tip.offsetWidth, th = this.tip.offsetHeight;
    this.tip.style.left = `${px + 16 + tw > this.width ? px - tw - 12 : px + 16}px`;
    this.tip.style.top = `${py + 16 + th > this.height ? Math.max(0, py - th - 12) : py + 16}px`;
  }

  // ----------------------------------------------------------------- input
  bind(q) {
    const c = this.canvas;
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const [px, py] = this.local(e);
      // a trackpad pinch arrives as a wheel event with ctrlKey and small deltas
      const delta = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
      this.zoomAt(Math.exp(-delta * (e.ctrlKey ? 0.01 : 0.0015)), px, py);
      this.showTip(px, py);
    }, { passive: false });
    c.addEventListener("pointerdown", (e) => {
      try { c.setPointerCapture(e.pointerId); } catch (error) { /* a pointer the browser no longer tracks */ }
      this.root.focus({ preventScroll: true });
      const [px, py] = this.local(e);
      this.pointers.set(e.pointerId, [px, py]);
      this.drag = { x: px, y: py, moved: false, box: e.shiftKey && this.pointers.size === 1,
                    cx: this.view.cx, cy: this.view.cy };
      if (this.pointers.size === 2) this.pinch = this.pinchState();
    });
    c.addEventListener("pointermove", (e) => {
      const [px, py] = this.local(e);
      if (!this.pointers.has(e.pointerId)) { this.showTip(px, py); return; }
      this.pointers.set(e.pointerId, [px, py]);
      if (this.pointers.size === 2 && this.pinch) {
        const now = this.pinchState();
        this.zoomAt(now.d / this.pinch.d, now.x, now.y);
        this.view.cx -= (now.x - this.pinch.x) / this.scale();
        this.view.cy -= (now.y - this.pinch.y) / this.scale();
        this.clampCentre();
        this.draw();  // zoomAt published the view before this pan: publish it again
        this.pinch = now;
        this.drag.moved = true;
        return;
      }
      const d = this.drag;
      if (!d) return;
      if (Math.hypot(px - d.x, py - d.y) > 4) d.moved = true;
      if (!d.moved) return;
      this.tip.hidden = true;
      if (d.box) {
        Object.assign(this.box.style, { left: `${Math.min(px, d.x)}px`, top: `${Math.min(py, d.y)}px`,
                                        width: `${Math.abs(px - d.x)}px`, height: `${Math.abs(py - d.y)}px` });
        this.box.hidden = false;
      } else {
        const s = this.scale();
        this.view.cx = d.cx - (px - d.x) / s;
        this.view.cy = d.cy - (py - d.y) / s;
        this.clampCentre();
        this.draw();
        this.moved();
      }
    });
    const end = (e) => {
      if (!this.pointers.has(e.pointerId)) return;
      this.pointers.delete(e.pointerId);
      if (this.pointers.size) { this.pinch = null; return; }
      const d = this.drag;
      this.drag = null;
      if (!d || e.type === "pointercancel") { this.box.hidden = true; return; }
      const [px, py] = this.local(e);
      if (d.box && d.moved) { this.boxSelect(d.x, d.y, px, py); return; }
      if (d.moved) return;
      this.select(this.cellAt(px, py), e.shiftKey || e.metaKey || e.ctrlKey);
    };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("pointerleave", () => {
      this.tip.hidden = true;
      if (this.hover) { this.hover = null; this.draw(); }
    });
    this.root.addEventListener("keydown", (e) => {
      const step = 0.15 / this.view.zoom;
      const keys = {
        "+": () => this.zoomAt(1.25, this.width / 2, this.height / 2),
        "=": () => this.zoomAt(1.25, this.width / 2, this.height / 2),
        "-": () => this.zoomAt(0.8, this.width / 2, this.height / 2),
        "_": () => this.zoomAt(0.8, this.width / 2, this.height / 2),
        "0": () => this.reset(),
        ArrowLeft: () => this.pan(-step, 0), ArrowRight: () => this.pan(step, 0),
        ArrowUp: () => this.pan(0, -step), ArrowDown: () => this.pan(0, step),
        Escape: () => { if (this.selected.size) { this.selected.clear(); this.draw(); this.send(); } },
        Enter: () => this.select(this.cellAt(this.width / 2, this.height / 2), e.shiftKey),
      };
      if (e.target.closest && e.target.closest("button, input")) return;  // their own keys
      if (keys[e.key] && !e.altKey && !e.metaKey && !e.ctrlKey) { e.preventDefault(); keys[e.key](); }
    });
    // the heat layer's switch and opacity act at once, in the browser
    this.legend.heatOn.addEventListener("change", (e) => { this.heat.on = e.target.checked; this.draw(); });
    this.legend.heatOpacity.addEventListener("input", (e) => { this.heat.opacity = +e.target.value; this.draw(); });
    q(".aq-in").addEventListener("click", () => this.zoomAt(1.5, this.width / 2, this.height / 2));
    q(".aq-out").addEventListener("click", () => this.zoomAt(1 / 1.5, this.width / 2, this.height / 2));
    q(".aq-reset").addEventListener("click", () => this.reset());
    q(".aq-full").addEventListener("click", () => {
      const doc = this.root.getRootNode();
      if ((doc.fullscreenElement || document.fullscreenElement) === this.root) document.exitFullscreen();
      else this.root.requestFullscreen().catch(() => {});
    });
    // the stage's size changes on entering or leaving fullscreen; the ResizeObserver redraws and
    // every pointer position is read against the canvas's box at that moment, so clicks keep
    // landing on the cell drawn under them
  }

  // a plain click selects the cell alone and is the latest click; with shift it toggles the cell
  select(hit, toggle) {
    if (!hit) return;
    const cell = [hit.level.size, hit.i, hit.j], k = cellKey(...cell);
    if (toggle) {
      if (this.selected.has(k)) this.selected.delete(k); else this.selected.set(k, cell);
    } else {
      this.selected = new Map([[k, cell]]);
      this.clicked = cell;
    }
    this.draw();
    this.send();
  }

  pan(dx, dy) {
    this.view.cx += dx;
    this.view.cy += dy;
    this.clampCentre();
    this.draw();
    this.moved();
  }

  reset() {
    this.view = { zoom: 1, cx: 0.5, cy: 0.5 };
    this.draw();
    this.moved();
  }

  pinchState() {
    const [[ax, ay], [bx, by]] = [...this.pointers.values()];
    return { x: (ax + bx) / 2, y: (ay + by) / 2, d: Math.max(1, Math.hypot(ax - bx, ay - by)) };
  }

  boxSelect(xa, ya, xb, yb) {
    this.box.hidden = true;
    const level = this.drawnLevel();
    if (!level) return;
    const g = level.size, [ua, va] = this.toUnit(Math.min(xa, xb), Math.min(ya, yb));
    const [ub, vb] = this.toUnit(Math.max(xa, xb), Math.max(ya, yb));
    let added = 0;
    // a cell is inside the box when its centre is
    for (let r = 0; r < level.cells.i.length; r++) {
      const i = level.cells.i[r], j = level.cells.j[r];
      const x = (j + 0.5) / g, y = (i + 0.5) / g;
      if (x >= ua && x <= ub && y >= va && y <= vb) {
        this.selected.set(cellKey(g, i, j), [g, i, j]);
        added++;
      }
    }
    this.draw();
    if (added) this.send();
  }
}

function escapeHtml(text) {
  const entities = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  return String(text).replace(/[&<>"']/g, (ch) => entities[ch]);
}

const maps = new WeakMap();

export default function (component) {
  const { data, parentElement, setStateValue } = component;
  let map = maps.get(parentElement);
  if (!map) {
    map = new AtlasMap(parentElement);
    maps.set(parentElement, map);
  }
  map.update(data, setStateValue);
  return () => {
    map.destroy();
    maps.delete(parentElement);
  };
}
