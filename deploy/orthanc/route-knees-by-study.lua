-- Orthanc auto-routing to SEVERAL agents: every newly stored knee radiograph (DX or CR) goes to
-- one agent chosen by its StudyInstanceUID, so all images of a study reach the same agent (with
-- node-owned storage an agent screens only the films it holds, and a study's SR needs them all).
-- The agents' own results (SR, secondary captures) are never routed back.
--
-- Load with the "LuaScripts" configuration option. Declare each agent in "DicomModalities" and
-- list the names below, in a fixed order: changing the list moves studies between agents (a study
-- already split that way still gets its SR on each agent from the images it holds).

local AGENTS = { "strnet1", "strnet2" }         -- names in DicomModalities, in this order
local KNEE_CODES = { ["72696002"] = true, ["T-15710"] = true }

-- The agents' AE titles, read from their DicomModalities entries ([AET, host, port] or
-- {"AET": ...}): what comes back from them (SRs, overlays) is never routed again.
local function agent_aets()
  local aets = {}
  local modalities = GetOrthancConfiguration()["DicomModalities"] or {}
  for _, name in ipairs(AGENTS) do
    local entry = modalities[name]
    if entry == nil then
      error("route-knees-by-study.lua: " .. name .. " is not in DicomModalities")
    end
    aets[entry["AET"] or entry[1]] = true
  end
  return aets
end
local AGENT_AETS = agent_aets()

local function is_knee(tags)
  local body = string.upper(tags["BodyPartExamined"] or "")
  if body == "KNEE" then
    return true
  end
  local region = tags["AnatomicRegionSequence"]
  if region ~= nil and region[1] ~= nil and KNEE_CODES[region[1]["CodeValue"] or ""] then
    return true
  end
  return false
end

-- A stable hash of the UID's characters (h = h * 31 + byte, modulo 2^31): the same in every
-- Orthanc and easy to compute elsewhere (docs/operations.md shows it in Python).
local function study_hash(uid)
  local h = 0
  for i = 1, string.len(uid) do
    h = (h * 31 + string.byte(uid, i)) % 2147483648
  end
  return h
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin["RequestOrigin"] == "DicomProtocol" and AGENT_AETS[metadata["RemoteAET"] or ""] then
    return
  end
  local modality = tags["Modality"] or ""
  if (modality == "DX" or modality == "CR") and is_knee(tags) then
    local uid = tags["StudyInstanceUID"] or ""
    -- queued by Orthanc's job engine; retried by Orthanc if that agent is unreachable
    SendToModality(instanceId, AGENTS[(study_hash(uid) % #AGENTS) + 1])
  end
end
