// The page at /: asks /info what the model does, sends an image to its endpoint as raw bytes, shows the answer.
// Plain JS, no dependencies; the API key (if the server wants one) lives in sessionStorage for this tab only.
'use strict';

const KEY_STORAGE = 'beit-api-key';
const TASKS = { classify: 'Classification', segment: 'Segmentation', embed: 'Feature extraction' };
// Distinct colours for classes, by class index; an overlay needs them opaque, the legend shows the same.
const PALETTE = [
  [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
  [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180],
  [0, 0, 128], [128, 128, 128],
];

const $ = (id) => document.getElementById(id);
let info = null;
let task = null;
let busy = false;
// The last image's object URL, released when the next one replaces it.
let lastUrl = null;

/** An answer that is not 2xx, worded as the server worded it. */
class ApiError extends Error {
  constructor(status, statusText, body, text) {
    const message = body && typeof body.error === 'string' ? body.error : (text || statusText);
    super(message);
    this.status = status;
    this.errorType = body && body.error_type;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

async function api(path, init) {
  const headers = new Headers((init && init.headers) || {});
  const key = apiKey();
  if (key) headers.set('Authorization', 'Bearer ' + key);
  const resp = await fetch(path, { ...init, headers, cache: 'no-store' });
  const text = await resp.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { /* not JSON: shown as text */ }
  if (!resp.ok) throw new ApiError(resp.status, resp.statusText, body, text);
  return body;
}

function showError(e) {
  const el = $('error');
  if (e instanceof ApiError) {
    el.textContent = `${e.status}${e.errorType ? ' ' + e.errorType : ''}: ${e.message}`;
  } else {
    el.textContent = `Error: ${e && e.message ? e.message : e}`;
  }
}

function clearError() {
  $('error').textContent = '';
}

// Counts finished API calls (success or error) so that tests and scripts can wait for the next one.
function answered(state, text) {
  const status = $('status');
  status.dataset.state = state;
  status.dataset.answers = String(Number(status.dataset.answers || 0) + 1);
  status.textContent = text;
}

function askForKey() {
  $('settings').open = true;
  $('api-key').focus();
}

async function loadInfo() {
  try {
    info = await api('/info');
  } catch (e) {
    info = null;
    showError(e);
    if (e instanceof ApiError && e.status === 401) askForKey();
    answered('error', '');
    return;
  }
  clearError();
  $('model-name').textContent = info.model_id || info.model_dir || '(unnamed)';
  $('model-arch').textContent = info.architecture || '';
  const tasks = (info.tasks || []).filter((t) => t in TASKS);
  // A classifier or a segmenter also embeds; its head is what it is for.
  task = ['classify', 'segment', 'embed'].find((t) => tasks.includes(t)) || null;
  showTask();
  // A model with several tasks gets a choice instead of the plain name.
  const select = $('task');
  select.replaceChildren(...tasks.map((t) => new Option(`${TASKS[t]} (/${t})`, t, false, t === task)));
  select.hidden = tasks.length < 2;
  $('task-name').hidden = tasks.length >= 2;
  const labels = info.labels || [];
  $('labels').replaceChildren(...labels.map((l) => {
    const li = document.createElement('li');
    li.textContent = l;
    return li;
  }));
  $('labels-summary').textContent = `${labels.length} label${labels.length === 1 ? '' : 's'}`;
  $('labels-box').hidden = labels.length === 0;
  answered('ready', '');
}

function showTask() {
  $('task-name').textContent = task ? `${TASKS[task]} (POST /${task})` : 'none';
  $('model').dataset.task = task || '';
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('the browser could not show this image'));
    img.src = url;
  });
}

function showOnly(id) {
  for (const part of ['classify-out', 'segment-out', 'embed-out']) $(part).hidden = part !== id;
  $('result').hidden = false;
}

function renderClassify(predictions, url) {
  $('preview').src = url;
  $('predictions').replaceChildren(...predictions.map((p, i) => {
    const li = document.createElement('li');
    li.dataset.label = p.label;
    li.dataset.score = String(p.score);
    const row = document.createElement('div');
    row.className = 'row';
    const label = document.createElement('span');
    label.className = 'label';
    label.textContent = p.label;
    const score = document.createElement('span');
    score.className = 'score';
    score.textContent = p.score.toFixed(4);
    if (i === 0) {
      label.id = 'top-label';
      score.id = 'top-score';
    }
    row.append(label, score);
    const bar = document.createElement('div');
    bar.className = 'bar';
    bar.setAttribute('role', 'presentation');
    const fill = document.createElement('span');
    // CSSOM, not a style attribute: the Content-Security-Policy allows no inline styles.
    fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`;
    bar.append(fill);
    li.append(row, bar);
    return li;
  }));
  showOnly('classify-out');
}

function colourOf(label, index) {
  const at = info && info.labels ? info.labels.indexOf(label) : -1;
  return PALETTE[(at >= 0 ? at : index) % PALETTE.length];
}

async function renderSegment(segments, url) {
  const img = await loadImage(url);
  const canvas = $('overlay');
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0, w, h);
  const out = ctx.getImageData(0, 0, w, h);
  const scratch = document.createElement('canvas');
  scratch.width = w;
  scratch.height = h;
  const sctx = scratch.getContext('2d', { willReadFrequently: true });
  const items = [];
  for (const [i, seg] of segments.entries()) {
    const mask = await loadImage('data:image/png;base64,' + seg.mask);
    sctx.clearRect(0, 0, w, h);
    sctx.drawImage(mask, 0, 0, w, h);
    const m = sctx.getImageData(0, 0, w, h).data;
    const [r, g, b] = colourOf(seg.label, i);
    const px = out.data;
    for (let p = 0; p < px.length; p += 4) {
      if (m[p] >= 128) {
        px[p] = (px[p] + r) >> 1;
        px[p + 1] = (px[p + 1] + g) >> 1;
        px[p + 2] = (px[p + 2] + b) >> 1;
      }
    }
    const li = document.createElement('li');
    li.dataset.label = seg.label;
    li.dataset.score = String(seg.score);
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.background = `rgb(${r}, ${g}, ${b})`;
    const name = document.createElement('span');
    name.textContent = seg.label;
    const share = document.createElement('span');
    share.className = 'share';
    share.textContent = `${(seg.score * 100).toFixed(1)} %`;
    li.append(swatch, name, share);
    items.push(li);
  }
  ctx.putImageData(out, 0, 0);
  $('legend').replaceChildren(...items);
  canvas.dataset.ready = 'true';
  showOnly('segment-out');
}

function renderEmbed(vector) {
  $('embed-size').textContent = String(vector.length);
  $('embed-values').textContent = vector.slice(0, 8).map((v) => v.toFixed(4)).join(', ') +
    (vector.length > 8 ? ', …' : '');
  showOnly('embed-out');
}

async function send(file) {
  if (!file || busy) return;
  if (!task) {
    // /info failed (no key yet?): try again, the answer says what is wrong.
    await loadInfo();
    if (!task) return;
  }
  busy = true;
  if (lastUrl) URL.revokeObjectURL(lastUrl);
  const url = URL.createObjectURL(file);
  lastUrl = url;
  $('status').dataset.state = 'busy';
  $('status').textContent = `Sending ${file.name || 'the image'} to /${task}…`;
  $('overlay').dataset.ready = 'false';
  try {
    // Raw bytes: the server takes any Content-Type but JSON or multipart as the image itself.
    const body = await api('/' + task, {
      method: 'POST',
      headers: { 'Content-Type': 'application/octet-stream' },
      body: file,
    });
    clearError();
    if (task === 'classify') renderClassify(body, url);
    else if (task === 'segment') await renderSegment(body, url);
    else renderEmbed(body);
    answered('done', '');
  } catch (e) {
    showError(e);
    if (e instanceof ApiError && e.status === 401) askForKey();
    answered('error', '');
  } finally {
    busy = false;
  }
}

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === 'file' && item.type.startsWith('image/')) return item.getAsFile();
  }
  return null;
}

function init() {
  const input = $('file');
  const drop = $('drop');
  input.addEventListener('change', () => {
    send(input.files[0]);
    // So that choosing the same file again still sends it.
    input.value = '';
  });
  // The drop zone is the input's label: a click opens the file chooser; Enter and Space do the same by keyboard.
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      input.click();
    }
  });
  drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    send(e.dataTransfer && e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) {
      e.preventDefault();
      send(file);
    }
  });
  $('task').addEventListener('change', (e) => {
    task = e.target.value;
    showTask();
  });
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const key = $('api-key').value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadInfo();
  });
  $('forget-key').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $('api-key').value = '';
    loadInfo();
  });
  $('api-key').value = apiKey();
  loadInfo();
}

init();
