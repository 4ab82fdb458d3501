-- Orthanc auto-routing: send every newly stored knee radiograph (DX or CR) to strnet-agent,
-- and never route back the agent's own results (its SR and secondary captures).
-- Load with the "LuaScripts" configuration option; the agent must be declared in
-- "DicomModalities" as "strnet".

local KNEE_CODES = { ["72696002"] = true, ["T-15710"] = true }

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

function OnStoredInstance(instanceId, tags, metadata, origin)
  -- results coming back from the agent arrive over DICOM with its AE title
  if origin["RequestOrigin"] == "DicomProtocol" and origin["CalledAet"] ~= nil
     and metadata["RemoteAET"] == "STRNET" then
    return
  end
  local modality = tags["Modality"] or ""
  if (modality == "DX" or modality == "CR") and is_knee(tags) then
    -- queued by Orthanc's job engine; retried by Orthanc if the agent is unreachable
    SendToModality(instanceId, "strnet")
  end
end
