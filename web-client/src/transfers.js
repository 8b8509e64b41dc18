// The app's files: "Send file" to everyone in the call, an offer to accept or decline, progress
// on both sides with Cancel, and a Save link once a file has arrived whole.

/** @typedef {import('./files.js').Transfer} Transfer */
/** @typedef {import('./client.js').Room} Room */

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const panel = $('files');
const list = $('files-list');
const input = /** @type {HTMLInputElement} */ ($('file-input'));

/** Rows by transfer id. @type {Map<string, HTMLLIElement>} */
const rows = new Map();
/** Object URLs handed out for saving, released when the room is left. @type {string[]} */
const urls = [];

/**
 * A size as people read it.
 * @param {number} bytes
 */
export function sizeText(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

/**
 * Wires the Send file button and the room's file events.
 * @param {Room} room
 * @param {(peerId: string) => string} nameOf
 * @param {(err: {code?: string, message?: string}) => void} showError
 */
export function watchFiles(room, nameOf, showError) {
  $('send-file').onclick = () => input.click();
  input.onchange = () => {
    const file = input.files?.[0];
    input.value = '';
    if (!file) return;
    try {
      for (const transfer of room.sendFile(file)) render(transfer, nameOf);
    } catch (err) {
      showError(/** @type {any} */ (err));
    }
  };
  for (const type of ['fileOffered', 'fileProgress', 'fileSent', 'fileReceived', 'fileDeclined', 'fileCancelled']) {
    room.on(type, (/** @type {Transfer} */ transfer) => render(transfer, nameOf));
  }
  room.on('fileFailed', ({ transfer }) => render(transfer, nameOf));
}

/** Forgets every row and releases the saved files (the room was left). */
export function clearFiles() {
  rows.clear();
  list.replaceChildren();
  panel.hidden = true;
  for (const url of urls.splice(0)) URL.revokeObjectURL(url);
}

/**
 * Shows one transfer as it stands.
 * @param {Transfer} transfer
 * @param {(peerId: string) => string} nameOf
 */
function render(transfer, nameOf) {
  let row = rows.get(transfer.id);
  if (!row) {
    row = document.createElement('li');
    row.dataset.transfer = transfer.id;
    rows.set(transfer.id, row);
    list.append(row);
  }
  panel.hidden = false;
  row.dataset.state = transfer.state;
  row.dataset.direction = transfer.direction;
  const who = nameOf(transfer.peerId);
  const what = document.createElement('span');
  what.className = 'what';
  // textContent only: a file's name is whatever the sender chose.
  what.textContent =
    transfer.direction === 'send'
      ? `${transfer.name} (${sizeText(transfer.size)}) to ${who}: ${SEND_WORDS[transfer.state]}`
      : `${who} sends ${transfer.name} (${sizeText(transfer.size)}): ${RECEIVE_WORDS[transfer.state]}`;
  /** @type {HTMLElement[]} */
  const parts = [what];
  if (transfer.state === 'sending' || transfer.state === 'receiving') {
    const bar = document.createElement('progress');
    bar.max = transfer.size || 1;
    bar.value = transfer.bytes;
    bar.setAttribute('aria-label', `${transfer.name}: ${Math.floor((transfer.bytes / (transfer.size || 1)) * 100)}%`);
    parts.push(bar);
  }
  if (transfer.direction === 'receive' && transfer.state === 'offered') {
    parts.push(button('Accept', () => transfer.accept()), button('Decline', () => transfer.decline()));
  } else if (transfer.state === 'offered' || transfer.state === 'sending' || transfer.state === 'receiving') {
    parts.push(button('Cancel', () => transfer.cancel()));
  }
  if (transfer.direction === 'receive' && transfer.state === 'done' && transfer.blob) {
    const save = document.createElement('a');
    const url = URL.createObjectURL(transfer.blob);
    urls.push(url);
    save.href = url;
    save.download = transfer.name;
    save.textContent = 'Save';
    parts.push(save);
  }
  row.replaceChildren(...parts);
}

/**
 * @param {string} label
 * @param {() => void} onClick
 */
function button(label, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  b.addEventListener('click', onClick);
  return b;
}

/** @type {Record<import('./files.js').TransferState, string>} */
const SEND_WORDS = {
  offered: 'waiting for them to accept',
  sending: 'sending',
  receiving: '',
  done: 'sent',
  declined: 'they declined it',
  cancelled: 'cancelled',
  failed: 'failed',
};

/** @type {Record<import('./files.js').TransferState, string>} */
const RECEIVE_WORDS = {
  offered: 'accept it?',
  sending: '',
  receiving: 'receiving',
  done: 'received',
  declined: 'declined',
  cancelled: 'cancelled',
  failed: 'failed',
};
