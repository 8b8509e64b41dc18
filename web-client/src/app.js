// The Switchboard meeting app: a join screen with a camera preview, and a call screen with a
// grid of tiles, a large stage for screen shares, chat, a participant list and a connection badge.
// Every remote <video> is watched by the SDK (room.observeVideo), so that each comes in the layer
// its size needs: small tiles a small one, the stage the full one.
import { Room, captureMedia, listDevices, tokenGrants } from './client.js';
import { goOnline, initCalls, render as renderLobby } from './calls.js';
import { initMeet, meet } from './meet.js';
import { clearFiles, watchFiles } from './transfers.js';

/** @typedef {import('./client.js').RemoteTrack} RemoteTrack */
/** @typedef {import('./client.js').ChatMessage} ChatMessage */
/** @typedef {import('./client.js').ConnectionQuality} ConnectionQuality */

/**
 * @typedef {object} Tile
 * @property {HTMLElement} el
 * @property {HTMLVideoElement} video
 * @property {HTMLAudioElement | null} audio
 * @property {HTMLElement} label
 * @property {Map<string, RemoteTrack>} tracks  by publicationId
 */

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const form = /** @type {HTMLFormElement} */ ($('join-form'));
const roomInput = /** @type {HTMLInputElement} */ ($('room'));
const nameInput = /** @type {HTMLInputElement} */ ($('name'));
const cameraSelect = /** @type {HTMLSelectElement} */ ($('camera-select'));
const micSelect = /** @type {HTMLSelectElement} */ ($('mic-select'));
const previewVideo = /** @type {HTMLVideoElement} */ ($('preview'));
const grid = $('grid');
const stage = $('stage');
const stageVideo = /** @type {HTMLVideoElement} */ ($('stage-video'));
const stageLabel = $('stage-label');
const errorBox = $('error');
const statusLine = $('status');
const qualityBadge = $('quality');
const controls = $('controls');
const micButton = $('mic');
const cameraButton = $('camera');
const shareButton = $('share');
const peopleToggle = $('people-toggle');
const peoplePanel = $('people');
const peopleList = $('people-list');
const chatToggle = $('chat-toggle');
const chatPanel = $('chat');
const chatLog = $('chat-log');
const chatForm = /** @type {HTMLFormElement} */ ($('chat-form'));
const chatInput = /** @type {HTMLInputElement} */ ($('chat-input'));

/** What people read for each error code; the code itself is shown too, for support. */
const FRIENDLY_ERRORS = /** @type {Record<string, string>} */ ({
  name_taken: 'Someone in this room already uses that name. Pick another one.',
  removed: 'You were removed from the room.',
  room_ended: 'The room was ended for everyone.',
  replaced: 'You joined this room from somewhere else, so this window left it.',
  server_full: 'The server cannot open another room now. Try again later.',
  room_full: 'This room is full.',
  media_unavailable:
    'Your camera or microphone is blocked or missing. Allow access in the browser to be seen and heard; you can still join to watch and listen.',
  unreachable: 'Cannot reach the server. Check the address and your connection.',
  socket: 'Lost the connection to the server.',
  unauthorized: 'You are not allowed into this room.',
  server_shutdown: 'The server is restarting.',
  timeout: 'The server did not answer in time.',
  not_supported: 'The call is changing how it connects: try sending the file again in a moment.',
  too_large: 'That file is too large to send (at most 100 MB).',
});
const STORAGE = { room: 'switchboard.room', name: 'switchboard.name' };

/** @type {Room | null} */
let room = null;
/** The current room's name on screen, when not its own (a call's room name is a long secret). @type {string | null} */
let roomLabel = null;
/** @type {Map<string, Tile>} remote tiles by peerId */
const tiles = new Map();
/** @type {Tile | null} */
let localTile = null;
/** The preview's media, handed to the room on join. @type {MediaStream | null} */
let preview = null;
/** The preview being captured: a join waits for it. @type {Promise<void>} */
let previewReady = Promise.resolve();
/** Tiles scrolled out of view pause their video: in a large room only what is seen is received. */
const visibility = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    const peerId = /** @type {HTMLElement} */ (entry.target).dataset.peerId;
    if (peerId) room?.pauseVideo(peerId, !entry.isIntersecting);
  }
});

const params = new URLSearchParams(location.search);
roomInput.value = params.get('room') ?? localStorage.getItem(STORAGE.room) ?? '';
nameInput.value = params.get('name') ?? localStorage.getItem(STORAGE.name) ?? '';

form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  join(roomInput.value.trim(), nameInput.value.trim());
});
cameraSelect.addEventListener('change', () => startPreview());
micSelect.addEventListener('change', () => startPreview());
micButton.addEventListener('click', () => {
  if (!room) return;
  room.setMicrophoneEnabled(!room.microphoneEnabled);
  renderControls();
  renderPeople();
});
cameraButton.addEventListener('click', () => {
  if (!room) return;
  room.setCameraEnabled(!room.cameraEnabled);
  renderControls();
});
shareButton.addEventListener('click', async () => {
  if (!room) return;
  try {
    if (room.screenTrack) room.stopScreenShare();
    else await room.startScreenShare();
  } catch (err) {
    // Closing the browser's picker is a choice, not an error.
    if (!(err instanceof DOMException && err.name === 'NotAllowedError')) showError(shareError(err));
  }
  renderControls();
});

/**
 * Why a screen share could not start, in words: browsers' own messages ("The object can not
 * be found here.") tell a person nothing.
 * @param {any} err
 * @returns {{code?: string, message: string}}
 */
function shareError(err) {
  // The SDK's own errors carry a string code; a DOMException's `code` is a legacy number.
  if (typeof err?.code === 'string') return err;
  switch (err?.name) {
    case 'NotFoundError':
      return { message: 'There is no screen or window this browser can share.' };
    case 'NotReadableError':
    case 'AbortError':
      return { message: 'The screen could not be captured: another program may be using it. Try again.' };
    case 'NotSupportedError':
    case 'TypeError':
      return { message: 'This browser cannot share a screen.' };
    default:
      return { message: 'The screen could not be shared.' };
  }
}
$('leave').addEventListener('click', () => room?.leave());
chatToggle.addEventListener('click', () => togglePanel(chatPanel, chatToggle));
peopleToggle.addEventListener('click', () => togglePanel(peoplePanel, peopleToggle));
chatForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = chatInput.value.trim();
  if (!room || room.state !== 'joined' || !text) return;
  room.sendChat(text);
  chatInput.value = '';
});

initCalls({
  join: joinInstead,
  currentRoom: () => (room?.state === 'joined' ? room.roomName : null),
  inCurrentRoom: (name) => [...(room?.participants.values() ?? [])].some((p) => p.name.toLowerCase() === name.toLowerCase()),
  say: (text) => {
    statusLine.textContent = text;
  },
  showError,
});
initMeet({
  join: joinInstead,
  leaveRoom: () => room?.leave(),
  showError,
});
// Going online and meeting someone need a name only, no room.
for (const [button, start, param] of /** @type {[string, (name: string) => void, string][]} */ ([
  ['go-online', goOnline, 'lobby'],
  ['meet-start', meet, 'meet'],
])) {
  $(button).addEventListener('click', () => {
    const name = nameInput.value.trim();
    if (!name) {
      nameInput.reportValidity();
      return;
    }
    localStorage.setItem(STORAGE.name, name);
    start(name);
  });
  if (nameInput.value && params.get(param) === '1') start(nameInput.value.trim());
}

const autojoin = roomInput.value && nameInput.value && params.get('autojoin') === '1';
startPreview().then(() => {
  if (autojoin) join(roomInput.value.trim(), nameInput.value.trim());
});

/** Shows the chosen (or default) camera and microphone before joining. */
function startPreview() {
  previewReady = previewReady.then(capturePreview);
  return previewReady;
}

async function capturePreview() {
  if (room) return;
  // A link for watching only: its token allows no sending, so no camera is asked for.
  const token = params.get('token');
  if (token && tokenGrants(token)?.publish === false) return;
  for (const track of preview?.getTracks() ?? []) track.stop();
  preview = null;
  try {
    preview = await captureMedia(micSelect.value || true, cameraSelect.value || true);
    previewVideo.srcObject = preview;
    // Only the preview's own error goes away: a refused join (a taken name) must stay readable.
    if (errorBox.dataset.from === 'preview') showError(null);
    await fillDeviceSelects();
  } catch (err) {
    previewVideo.srcObject = null;
    // A failed join says more than a preview that could not start again after it.
    if (errorBox.hidden) {
      showError(/** @type {any} */ (err));
      errorBox.dataset.from = 'preview';
    }
  }
}

async function fillDeviceSelects() {
  const { cameras, microphones } = await listDevices();
  const current = (/** @type {'audio' | 'video'} */ kind) => preview?.getTracks().find((t) => t.kind === kind)?.getSettings().deviceId;
  for (const [select, devices, kind] of /** @type {[HTMLSelectElement, MediaDeviceInfo[], 'audio' | 'video'][]} */ ([
    [cameraSelect, cameras, 'video'],
    [micSelect, microphones, 'audio'],
  ])) {
    select.replaceChildren(
      ...devices.map((d, i) => new Option(d.label || `${kind === 'video' ? 'Camera' : 'Microphone'} ${i + 1}`, d.deviceId)),
    );
    const active = current(kind);
    if (active) select.value = active;
  }
}

/**
 * Joins a call or a match, leaving the room the app is in first, as a phone puts one call down
 * for the next.
 * @param {string} roomName
 * @param {string} name
 * @param {string} token
 * @param {string} label
 */
function joinInstead(roomName, name, token, label) {
  room?.leave();
  join(roomName, name, token, label);
}

/**
 * @param {string} roomName
 * @param {string} name
 * @param {string} [callToken]  the token of an accepted call
 * @param {string} [label]  what to call the room on screen ("Call with Bob") instead of its name
 */
async function join(roomName, name, callToken, label) {
  if (!roomName || !name || room) return;
  showError(null);
  setFormEnabled(false);
  statusLine.textContent = `Joining ${label ?? roomName}…`;
  localStorage.setItem(STORAGE.room, roomName);
  localStorage.setItem(STORAGE.name, name);

  const current = new Room();
  room = current;
  roomLabel = label ?? null;
  watchFiles(current, (peerId) => current.participants.get(peerId)?.name ?? 'someone', showError);
  // For end-to-end tests and the console.
  Object.assign(window, { __switchboard: current });

  current.on('localStream', (/** @type {MediaStream | null} */ stream) => {
    if (!stream) {
      localTile?.el.remove();
      localTile = null;
      return;
    }
    localTile ??= createTile('local', `${name} (you)`, true);
    setTracks(localTile.video, stream.getVideoTracks());
  });
  current.on('participantJoined', (p) => {
    ensureTile(p.peerId, p.name);
    renderStatus();
    renderPeople();
  });
  current.on('participantUpdated', (p) => {
    const tile = tiles.get(p.peerId);
    if (tile) tile.label.textContent = p.name;
    renderPeople();
  });
  current.on('participantLeft', (p) => {
    const gone = tiles.get(p.peerId);
    if (gone) visibility.unobserve(gone.el);
    if (gone) current.unobserveVideo(gone.video);
    gone?.el.remove();
    tiles.delete(p.peerId);
    layoutGrid();
    renderStatus();
    renderPeople();
    renderStage();
  });
  current.on('trackSubscribed', (/** @type {RemoteTrack} */ t) => {
    const tile = ensureTile(t.peerId, current.participants.get(t.peerId)?.name ?? t.peerId);
    tile.tracks.set(t.publicationId, t);
    renderTileMedia(tile);
    renderStage();
  });
  current.on('trackUnsubscribed', (/** @type {RemoteTrack} */ t) => {
    const tile = tiles.get(t.peerId);
    if (!tile || tile.tracks.get(t.publicationId) !== t) return;
    tile.tracks.delete(t.publicationId);
    renderTileMedia(tile);
    renderStage();
  });
  current.on('videoAllocation', ({ peerId, source, state }) => {
    const tile = peerId ? tiles.get(peerId) : null;
    if (!tile || source !== 'camera') return;
    if (state === 'full') delete tile.el.dataset.allocation;
    else tile.el.dataset.allocation = state;
  });
  current.on('trackMuted', ({ peerId, publicationId, muted }) => {
    const tile = tiles.get(peerId);
    const t = tile?.tracks.get(publicationId);
    if (!tile || !t) return;
    t.muted = muted;
    renderTileMedia(tile);
    renderPeople();
  });
  current.on('activeSpeaker', ({ peerId }) => {
    for (const [id, tile] of tiles) toggleAttr(tile.el, 'speaking', id === peerId);
    layoutGrid();
  });
  current.on('connectionQuality', (/** @type {ConnectionQuality} */ q) => {
    qualityBadge.hidden = false;
    qualityBadge.dataset.quality = q.quality;
    const rtt = q.rttMs == null ? '–' : `${q.rttMs} ms`;
    qualityBadge.textContent = `${rtt} · ${q.lossPercent}% loss · ↑${q.sendKbps} ↓${q.receiveKbps} kbit/s`;
    qualityBadge.title = `Connection ${q.quality}: round trip ${rtt}, ${q.lossPercent}% of incoming packets lost`;
  });
  current.on('mutedByAdmin', ({ kind }) => {
    renderControls();
    statusLine.textContent = kind === 'audio' ? 'The host muted your microphone.' : 'The host turned off your camera.';
  });
  current.on('modeChanged', () => {
    renderStatus();
    renderControls();
  });
  current.on('chatMessage', (/** @type {ChatMessage} */ m) => appendChat(m, current));
  current.on('error', (e) => showError(e));
  current.on('reconnecting', () => {
    statusLine.textContent = 'Connection lost. Reconnecting…';
    statusLine.dataset.reconnecting = '';
    setControlsEnabled(false);
  });
  current.on('reconnected', () => {
    delete statusLine.dataset.reconnecting;
    setControlsEnabled(true);
    showError(null);
    renderStatus();
  });
  current.on('disconnected', ({ reason }) => {
    if (room !== current) return;
    reset();
    renderLobby();
    statusLine.textContent = reason === 'left' ? 'You left the room.' : `Disconnected: ${reason}`;
    startPreview();
  });

  await previewReady;
  if (room !== current) return;
  const stream = preview;
  preview = null;
  previewVideo.srcObject = null;
  try {
    // Without camera and microphone (blocked), join to watch and listen.
    // A link from the operator's backend carries the token (a server with API keys mints none
    // for pages).
    const token = callToken ?? params.get('token') ?? undefined;
    await current.connect(location.origin, { room: roomName, name, stream: stream ?? undefined, audio: false, video: false, token });
  } catch (err) {
    if (room !== current) return;
    reset();
    statusLine.textContent = '';
    showError(/** @type {any} */ (err));
    startPreview();
    return;
  }
  if (room !== current || current.state !== 'joined') return;
  form.hidden = true;
  controls.hidden = false;
  renderControls();
  renderStatus();
  renderPeople();
  renderLobby();
}

function reset() {
  room = null;
  clearFiles();
  for (const tile of tiles.values()) {
    visibility.unobserve(tile.el);
    tile.el.remove();
  }
  tiles.clear();
  localTile?.el.remove();
  localTile = null;
  chatLog.replaceChildren();
  chatPanel.hidden = true;
  peoplePanel.hidden = true;
  chatToggle.textContent = 'Chat';
  qualityBadge.hidden = true;
  form.hidden = false;
  controls.hidden = true;
  setControlsEnabled(true);
  renderStage();
  setFormEnabled(true);
}

/**
 * @param {HTMLElement} panel
 * @param {HTMLElement} button
 */
function togglePanel(panel, button) {
  panel.hidden = !panel.hidden;
  button.setAttribute('aria-pressed', String(!panel.hidden));
  if (panel === chatPanel) {
    chatToggle.textContent = 'Chat';
    if (!panel.hidden) chatInput.focus();
  }
}

/**
 * @param {ChatMessage} message
 * @param {Room} current
 */
function appendChat(message, current) {
  const item = document.createElement('li');
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = message.peerId === current.participantId ? 'You' : message.name;
  const text = document.createElement('span');
  text.className = 'text';
  // textContent, never innerHTML: a message is shown exactly as typed.
  text.textContent = message.text;
  item.append(who, text);
  item.title = new Date(message.at).toLocaleTimeString();
  chatLog.append(item);
  chatLog.scrollTop = chatLog.scrollHeight;
  if (chatPanel.hidden && message.peerId !== current.participantId) {
    chatToggle.textContent = 'Chat •';
  }
}

/**
 * @param {string} peerId
 * @param {string} name
 */
function ensureTile(peerId, name) {
  let tile = tiles.get(peerId);
  if (!tile) {
    tile = createTile('remote', name, false);
    tile.el.dataset.peerId = peerId;
    tiles.set(peerId, tile);
    layoutGrid();
    visibility.observe(tile.el);
    room?.observeVideo(tile.video, peerId, 'camera');
  }
  return tile;
}

/**
 * @param {'local' | 'remote'} kind
 * @param {string} name
 * @param {boolean} first  place the tile before the others (the self-view)
 * @returns {Tile}
 */
function createTile(kind, name, first) {
  const el = document.createElement('div');
  el.className = `tile ${kind}`;
  const video = document.createElement('video');
  // Video elements are muted so autoplay is allowed; remote sound plays through <audio>.
  video.muted = true;
  video.autoplay = true;
  video.playsInline = true;
  el.append(video);
  /** @type {HTMLAudioElement | null} */
  let audio = null;
  if (kind === 'remote') {
    audio = document.createElement('audio');
    audio.autoplay = true;
    el.append(audio);
    el.dataset.noVideo = '';
  }
  const label = document.createElement('span');
  label.className = 'label';
  label.textContent = name;
  el.append(label);
  if (first) grid.prepend(el);
  else grid.append(el);
  return { el, video, audio, label, tracks: new Map() };
}

/**
 * From this many remote tiles, the active speaker's tile is shown twice as wide and high: the
 * server then sends it a higher simulcast layer, and the small tiles stay on low ones.
 */
const SPEAKER_LARGE_FROM_TILES = 4;

function layoutGrid() {
  grid.classList.toggle('large-room', tiles.size >= SPEAKER_LARGE_FROM_TILES);
}

/** @param {Tile} tile */
function renderTileMedia(tile) {
  const all = [...tile.tracks.values()];
  const video = all.find((t) => t.kind === 'video' && t.source === 'camera');
  const audios = all.filter((t) => t.kind === 'audio');

  setTracks(tile.video, video ? [video.track] : []);
  if (tile.audio) setTracks(tile.audio, audios.map((t) => t.track));

  toggleAttr(tile.el, 'noVideo', !video || video.muted);
  toggleAttr(tile.el, 'micMuted', audios.some((t) => t.source === 'microphone' && t.muted));
}

/** Shows the latest remote screen share large, above the grid. */
function renderStage() {
  /** @type {{track: RemoteTrack, name: string} | null} */
  let shown = null;
  for (const tile of tiles.values()) {
    for (const t of tile.tracks.values()) {
      if (t.kind === 'video' && t.source === 'screen') shown = { track: t, name: tile.label.textContent ?? '' };
    }
  }
  stage.hidden = !shown;
  setTracks(stageVideo, shown ? [shown.track.track] : []);
  if (shown) room?.observeVideo(stageVideo, shown.track.peerId, 'screen');
  else room?.unobserveVideo(stageVideo);
  stageLabel.textContent = shown ? `${shown.name}'s screen` : '';
  document.body.toggleAttribute('data-stage', !!shown);
}

function renderPeople() {
  if (!room) return;
  const current = room;
  const entries = [
    { name: `${current.name ?? ''} (you)`, muted: !current.microphoneEnabled },
    ...[...current.participants.values()].map((p) => ({
      name: p.name,
      muted: [...p.tracks.values()].some((t) => t.source === 'microphone' && t.muted),
    })),
  ];
  peopleList.replaceChildren(
    ...entries.map(({ name, muted }) => {
      const li = document.createElement('li');
      li.textContent = name;
      if (muted) li.dataset.micMuted = '';
      return li;
    }),
  );
  peopleToggle.textContent = `People (${entries.length})`;
  // Who is in the call shows in the online list too (no Invite for them).
  renderLobby();
}

/**
 * Gives a media element a fresh stream whenever its set of tracks changes.
 * @param {HTMLMediaElement} el
 * @param {MediaStreamTrack[]} tracks
 */
function setTracks(el, tracks) {
  const current = el.srcObject instanceof MediaStream ? el.srcObject.getTracks() : [];
  if (current.length === tracks.length && tracks.every((t) => current.includes(t))) return;
  el.srcObject = tracks.length ? new MediaStream(tracks) : null;
  if (tracks.length) playMedia(el);
}

/** @param {HTMLMediaElement} el */
function playMedia(el) {
  el.play().catch(() => {
    // Autoplay with sound needs a user gesture when the page joined by itself (autojoin).
    statusLine.textContent = 'Click anywhere to enable sound.';
    document.addEventListener(
      'click',
      () => {
        for (const m of document.querySelectorAll('main video, main audio')) {
          /** @type {HTMLMediaElement} */ (m).play().catch(() => {});
        }
        renderStatus();
      },
      { once: true },
    );
  });
}

/**
 * @param {HTMLElement} el
 * @param {string} name
 * @param {boolean} on
 */
function toggleAttr(el, name, on) {
  if (on) el.dataset[name] = '';
  else delete el.dataset[name];
}

/** @param {{code?: string, message?: string} | null} err */
function showError(err) {
  if (!err) {
    errorBox.hidden = true;
    errorBox.textContent = '';
    delete errorBox.dataset.code;
    delete errorBox.dataset.from;
    return;
  }
  const code = err.code ?? '';
  const text = FRIENDLY_ERRORS[code] ?? err.message ?? 'Something went wrong.';
  errorBox.textContent = code ? `${text} (${code})` : text;
  errorBox.dataset.code = code;
  delete errorBox.dataset.from;
  errorBox.hidden = false;
}

/**
 * Everything but Leave waits while the connection is being restored.
 * @param {boolean} enabled
 */
function setControlsEnabled(enabled) {
  for (const button of controls.querySelectorAll('button')) {
    if (button.id !== 'leave') /** @type {HTMLButtonElement} */ (button).disabled = !enabled;
  }
  chatInput.disabled = !enabled;
}

/** @param {boolean} enabled */
function setFormEnabled(enabled) {
  for (const el of form.elements) /** @type {HTMLInputElement} */ (el).disabled = !enabled;
}

function renderStatus() {
  if (!room || room.state !== 'joined') return;
  const others = room.participants.size;
  // Discreet: how media flows is the server's business, but worth a glance when debugging.
  const mode = room.mode === 'mesh' ? 'peer-to-peer' : 'via server';
  const switching = room.switching ? ' (switching)' : '';
  const watching = room.canPublish ? '' : ' · watching only';
  statusLine.textContent = `${roomLabel ?? room.roomName ?? ''} · ${others + 1} participant${others ? 's' : ''}${watching} · ${mode}${switching}`;
  statusLine.dataset.mode = room.mode;
}

function renderControls() {
  if (!room) return;
  // A viewer's token allows no sending: nothing to turn on.
  for (const button of [micButton, cameraButton, shareButton]) button.hidden = !room.canPublish;
  // Files go browser to browser in a mesh and through the server on the SFU; while the room
  // changes between the two, someone may not be reachable either way.
  $('send-file').hidden = room.switching;
  const mic = room.microphoneEnabled;
  const cam = room.cameraEnabled;
  const sharing = !!room.screenTrack;
  micButton.textContent = mic ? 'Mute mic' : 'Unmute mic';
  micButton.setAttribute('aria-pressed', String(mic));
  cameraButton.textContent = cam ? 'Stop camera' : 'Start camera';
  cameraButton.setAttribute('aria-pressed', String(cam));
  shareButton.textContent = sharing ? 'Stop sharing' : 'Share screen';
  shareButton.setAttribute('aria-pressed', String(sharing));
}
