"""The page's frame, inline style and script: the atlas drawn on a canvas from its sprite sheets,
paging, a clicked code's panel (usage, where in the grid, nearest codes) and the usage maps.

The script reads the atlas's JSON from ``#atlas-data``; any error it raises is written into
``#js-errors`` (and the console), and ``body[data-ready]`` is set once it has run, so a headless
browser can check the page (tests/report/test_report_browser.py).
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body><header><h1>{title}</h1><p>written {when} by <code>vqvae report</code> &middot; {nav}</p>
</header>
<pre id="js-errors"></pre>
{body}
{data}
<script>{script}</script>
</body></html>
"""

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:20px;word-break:break-all}h2{border-bottom:1px solid #ccc;margin-top:28px}
table{border-collapse:collapse}th{text-align:left;vertical-align:top;padding:2px 10px 2px 0}
td{padding:2px 0}code{font-size:12px}.m{display:inline-block;margin-right:12px}
.warn{background:#fff4e5;border:1px solid #f0b060;padding:4px 12px}.ok{color:#686}
.charts{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.chart{background:#fafafa;border:1px solid #ddd}.chart .frame{fill:none;stroke:#bbb}
.ct{font-size:11px;text-anchor:middle}.yl{font-size:10px;text-anchor:end}.xl{font-size:10px}
.lg{font-size:10px}img.px,canvas{image-rendering:pixelated}
#js-errors:empty{display:none}#js-errors{color:#b00;border:1px solid #b00;padding:6px}
.atlas-wrap{display:flex;gap:16px;align-items:flex-start}
#atlas-canvas{border:1px solid #ccc;cursor:pointer;max-width:75vw}
#atlas-selected{min-width:260px}#atlas-selected canvas{border:1px solid #ccc;margin:2px}
.nb{display:inline-block;text-align:center;font-size:10px;cursor:pointer;margin:2px}
.frames td img{margin-right:12px;vertical-align:top}
#usage-maps{display:flex;flex-wrap:wrap;gap:8px}#usage-maps div{font-size:10px;text-align:center}
"""

SCRIPT = r"""
(function () {
  const errors = document.getElementById('js-errors');
  window.addEventListener('error', e => { errors.textContent += 'error: ' + e.message + '\n'; });
  const A = JSON.parse(document.getElementById('atlas-data').textContent);
  if (!A) { document.body.dataset.ready = '1'; return; }
  const rank = new Int32Array(A.k);
  A.order.forEach((c, i) => { rank[c] = i; });
  const scale = Math.max(1, Math.round(32 / A.side)), T = A.side * scale, GAP = 2;
  const W = 2 * T + 1;  // a tile on the page: patch | 1-pixel line | drawing
  const pages = Math.ceil(A.k / A.perPage), images = {};
  const bytes = Uint8Array.from(atob(A.grids), ch => ch.charCodeAt(0));
  const grids = A.gridBytes === 2 ? new Uint16Array(bytes.buffer) : new Uint32Array(bytes.buffer);
  const cells = A.grid[0] * A.grid[1];
  const canvas = document.getElementById('atlas-canvas'), ctx = canvas.getContext('2d');
  let page = 0, selected = -1;

  function sheet(p) {
    if (!images[p]) {
      images[p] = new Promise(done => { const im = new Image(); im.onload = () => done(im);
                                        im.src = A.pages[p]; });
    }
    return images[p];
  }
  function paint(target, im, i, x, y, t) {  // tile i of sheet im at (x, y): two t x t halves
    const sx = (i % A.columns) * 2 * A.side, sy = Math.floor(i / A.columns) * A.side;
    target.imageSmoothingEnabled = false;
    target.drawImage(im, sx, sy, A.side, A.side, x, y, t, t);
    target.drawImage(im, sx + A.side, sy, A.side, A.side, x + t + 1, y, t, t);
  }
  function tileAt(code, target, t) {  // draw code's tile into a 2d context at (0, 0)
    const r = rank[code];
    return sheet(Math.floor(r / A.perPage)).then(im => paint(target, im, r % A.perPage, 0, 0, t));
  }
  function place(code) {
    const i = rank[code] - page * A.perPage;
    if (i < 0 || i >= A.perPage) return null;
    return [(i % A.columns) * (W + GAP), Math.floor(i / A.columns) * (T + GAP)];
  }
  function draw() {
    const ids = A.order.slice(page * A.perPage, (page + 1) * A.perPage);
    canvas.width = A.columns * (W + GAP);
    canvas.height = Math.ceil(ids.length / A.columns) * (T + GAP);
    sheet(page).then(im => {
      ctx.imageSmoothingEnabled = false;
      ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, canvas.width, canvas.height);
      ids.forEach((c, i) => {
        const x = (i % A.columns) * (W + GAP), y = Math.floor(i / A.columns) * (T + GAP);
        paint(ctx, im, i, x, y, T);
        if (A.counts[c] === 0) {
          ctx.strokeStyle = 'rgba(214,39,40,0.9)'; ctx.lineWidth = 2; ctx.beginPath();
          ctx.moveTo(x, y); ctx.lineTo(x + W, y + T); ctx.moveTo(x + W, y);
          ctx.lineTo(x, y + T); ctx.stroke();
        }
      });
      if (selected >= 0) {
        outline(selected, '#ffb000', 3);
        A.neighbours[selected].forEach(n => outline(n, '#00a0ff', 2));
      }
      // how many pixels the atlas painted (not white): a check a headless browser can read
      const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      let painted = 0;
      for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] < 765) painted++;
      canvas.dataset.painted = painted;
    });
    document.getElementById('atlas-page-label').textContent =
      'page ' + (page + 1) + ' of ' + pages + ' (codes ranked ' + (page * A.perPage + 1) + '-' +
      Math.min(A.k, (page + 1) * A.perPage) + ' by usage)';
  }
  function outline(code, colour, width) {
    const at = place(code);
    if (!at) return;
    ctx.strokeStyle = colour; ctx.lineWidth = width;
    ctx.strokeRect(at[0] + 1, at[1] + 1, W - 2, T - 2);
  }
  function positions(code) {
    const counts = new Float64Array(cells);
    for (let i = 0; i < grids.length; i++) if (grids[i] === code) counts[i % cells] += 1;
    return counts;
  }
  function heat(code, size) {  // a canvas: where in the grid `code` is used
    const counts = positions(code), c = document.createElement('canvas');
    const most = Math.max(1, ...counts), cell = Math.max(4, Math.floor(size / A.grid[1]));
    c.width = A.grid[1] * cell; c.height = A.grid[0] * cell;
    const g = c.getContext('2d');
    g.fillStyle = '#fff'; g.fillRect(0, 0, c.width, c.height);
    counts.forEach((v, i) => {
      g.fillStyle = 'rgba(31,119,180,' + (v / most).toFixed(3) + ')';
      g.fillRect((i % A.grid[1]) * cell, Math.floor(i / A.grid[1]) * cell, cell - 1, cell - 1);
    });
    c.title = 'code ' + code + ': most used position ' + most + ' of ' + A.images + ' images';
    return c;
  }
  function thumb(code, t) {
    const c = document.createElement('canvas');
    c.width = 2 * t + 1; c.height = t;
    tileAt(code, c.getContext('2d'), t);
    return c;
  }
  function select(code) {
    selected = code;
    const p = Math.floor(rank[code] / A.perPage);
    if (p !== page) page = p;
    draw();
    const box = document.getElementById('atlas-selected');
    box.innerHTML = '';
    const head = document.createElement('p');
    const total = A.counts.reduce((a, b) => a + b, 0);
    head.innerHTML = '<b>code ' + code + '</b>: ' + A.counts[code] + ' held-out uses (' +
      (100 * A.counts[code] / Math.max(total, 1)).toFixed(2) + '%), usage rank ' +
      (rank[code] + 1) + (A.counts[code] === 0 ? ', <b style="color:#d62728">dead</b>' : '');
    box.appendChild(head);
    box.appendChild(thumb(code, 64));
    const where = document.createElement('p');
    where.textContent = 'where in the ' + A.grid[0] + 'x' + A.grid[1] + ' grid it is used:';
    box.appendChild(where);
    box.appendChild(heat(code, 128));
    const near = document.createElement('p');
    near.textContent = 'nearest codes (codebook distance):';
    box.appendChild(near);
    A.neighbours[code].forEach((n, j) => {
      const d = document.createElement('div');
      d.className = 'nb';
      d.appendChild(thumb(n, 24));
      d.appendChild(document.createElement('br'));
      d.appendChild(document.createTextNode(n + ' (' + A.distances[code][j] + ')'));
      d.onclick = () => select(n);
      box.appendChild(d);
    });
  }
  function codeAt(ev) {
    const box = canvas.getBoundingClientRect();
    const x = (ev.clientX - box.left) * canvas.width / box.width;
    const y = (ev.clientY - box.top) * canvas.height / box.height;
    const col = Math.floor(x / (W + GAP)), row = Math.floor(y / (T + GAP));
    const i = page * A.perPage + row * A.columns + col;
    return col < A.columns && i < Math.min(A.k, (page + 1) * A.perPage) ? A.order[i] : -1;
  }
  canvas.addEventListener('click', ev => { const c = codeAt(ev); if (c >= 0) select(c); });
  canvas.addEventListener('mousemove', ev => {
    const c = codeAt(ev);
    canvas.title = c < 0 ? '' : 'code ' + c + ': ' + A.counts[c] + ' held-out uses' +
      (A.counts[c] === 0 ? ' (dead)' : '');
  });
  const turn = by => () => { page = (page + pages + by) % pages; draw(); };
  document.getElementById('atlas-prev').onclick = turn(-1);
  document.getElementById('atlas-next').onclick = turn(1);
  document.getElementById('atlas-find').onchange = ev => {
    const c = parseInt(ev.target.value, 10);
    if (c >= 0 && c < A.k) select(c);
  };
  const maps = document.getElementById('usage-maps');
  A.order.slice(0, 12).filter(c => A.counts[c] > 0).forEach(c => {
    const d = document.createElement('div');
    d.appendChild(heat(c, 64));
    d.appendChild(document.createElement('br'));
    d.appendChild(document.createTextNode('code ' + c));
    maps.appendChild(d);
  });
  const asked = /^#code=(\d+)$/.exec(location.hash);  // a link to one code: report.html#code=7
  if (asked && +asked[1] < A.k) select(+asked[1]); else draw();
  sheet(0).then(() => { document.body.dataset.ready = '1'; });
})();
"""
